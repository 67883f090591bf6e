"""Serving real-size images: one 3x224x224 image a request, JSON against binary tensor data, at 1, 4 and
16 concurrent clients; and what batching would buy on this CPU.

    python bench/serving_images.py [--seconds 15] [--checkpoint runs/resnet18/best.pt]

The model is torchvision's ResNet-18 (bench/resnet_task.py: 10 classes, random weights), trained for a
few steps (unless --checkpoint names one) and exported with `python -m export` into a temporary model
store, then served by `bentoml serve` on 127.0.0.1. Each client is a thread on one kept-alive connection
that sends `POST /v2/models/resnet18/infer` with one image, again and again, for --seconds: as JSON
(values with three decimals, the smallest JSON a client can send: about 0.9 MB, under the 1 MiB JSON
limit) or with Triton's binary tensor extension (602 KB of float32, as tritonclient sends it by
default). For each (clients, encoding) it prints requests/s and the p50 and p99 latency; the two
encodings alternate at each client count. Every answer is checked (200, 10 logits).

The floor: onnxruntime alone on the same graph, in this process, one image a call against 16 images a
call (per image), with the server's session settings (one intra-op thread) and with 2 threads. If 16
images a call cost about as much per image as one, batching requests in the server cannot pay here.

Run it on an otherwise idle machine.
"""

import argparse
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from t2d.cpu import describe  # noqa: E402

PATH = "/v2/models/resnet18/infer"
SHAPE = (3, 224, 224)


def env_for(home: Path) -> dict:
    return {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "bench"), str(ROOT)])}


def prepare(tmp: Path, checkpoint: Path | None) -> Path:
    """Train (unless given a checkpoint) and export the ResNet into tmp/bentoml; returns the ONNX file."""
    env = env_for(tmp / "bentoml")
    if checkpoint is None:
        checkpoint = tmp / "run" / "best.pt"
        subprocess.run([sys.executable, "-m", "train", "--task", "resnet_task:TASK", "--out", str(tmp / "run"),
                        "--log.tensorboard", "false", "--log.plots", "false"], cwd=ROOT, env=env, check=True,
                       stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "export", "--task", "resnet_task:TASK", "--checkpoint", str(checkpoint),
                    "--out", str(tmp / "export"), "--format", "onnx", "--batch-sizes", "1,16"], cwd=ROOT, env=env,
                   check=True)
    return tmp / "export" / "model.onnx"


def floor(onnx_file: Path, calls: int = 20) -> None:
    """onnxruntime alone: ms per image at 1 and 16 images a call, 1 and 2 intra-op threads."""
    x = np.random.default_rng(0).random((16, *SHAPE), dtype=np.float32)
    for threads in (1, 2):
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        per_image = {}
        for batch in (1, 16):
            session.run(None, {name: x[:batch]})
            times = []
            for _ in range(calls if batch == 1 else max(3, calls // 4)):
                start = time.perf_counter()
                session.run(None, {name: x[:batch]})
                times.append(time.perf_counter() - start)
            per_image[batch] = statistics.median(times) / batch * 1000
        print(f"onnxruntime alone, {threads} thread(s): {per_image[1]:.1f} ms an image at batch 1, "
              f"{per_image[16]:.1f} ms an image at batch 16 ({per_image[1] / per_image[16]:.2f}x the throughput "
              f"from batching)")


def bodies(image: np.ndarray) -> dict[str, tuple[bytes, dict]]:
    """encoding -> (body, headers) for one image."""
    shape = [1, *SHAPE]
    data = [round(float(v), 3) for v in image.ravel()]
    as_json = json.dumps({"inputs": [{"name": "image", "shape": shape, "datatype": "FP32", "data": data}]},
                         separators=(",", ":")).encode()
    raw = image.astype("<f4").tobytes()
    header = json.dumps({"inputs": [{"name": "image", "shape": shape, "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    return {"json": (as_json, {"Content-Type": "application/json"}),
            "binary": (header + raw, {"Content-Type": "application/octet-stream",
                                      "Inference-Header-Content-Length": str(len(header))})}


def check(status: int, body: bytes, headers: dict, encoding: str) -> None:
    if status != 200:
        raise RuntimeError(f"{encoding}: HTTP {status}: {body[:200]!r}")
    if encoding == "json":
        out = json.loads(body)["outputs"][0]
        ok = out["shape"] == [1, 10] and len(out["data"]) == 10
    else:
        n = int(headers.get("inference-header-content-length", 0))
        out = json.loads(body[:n])["outputs"][0]
        ok = out["shape"] == [1, 10] and len(body) - n == 40
    if not ok:
        raise RuntimeError(f"{encoding}: unexpected answer {body[:200]!r}")


def load(port: int, body: bytes, headers: dict, encoding: str, clients: int, seconds: float) -> list[float]:
    """Latencies (s) of every request `clients` threads completed in `seconds`."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        try:
            while time.monotonic() < end:
                start = time.perf_counter()
                conn.request("POST", PATH, body=body, headers=headers)
                reply = conn.getresponse()
                data = reply.read()
                mine.append(time.perf_counter() - start)
                check(reply.status, data, {k.lower(): v for k, v in reply.getheaders()}, encoding)
        except Exception as e:  # reported below: a benchmark that hides errors measures nothing
            errors.append(str(e))
        finally:
            conn.close()
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"error: {len(errors)} client(s) failed, first: {errors[0]}")
    return latencies


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(tmp: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=ROOT, env=env_for(tmp / "bentoml"), stdout=open(tmp / "serve.log", "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"error: the server did not become ready:\n{(tmp / 'serve.log').read_text()[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--checkpoint", type=Path, help="a resnet_task checkpoint (default: train one briefly)")
    args = parser.parse_args()
    print(f"CPU: {describe()}; {os.cpu_count()} cores; onnxruntime {ort.__version__}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    tmp = Path(tempfile.mkdtemp(prefix="serving-images-"))
    try:
        onnx_file = prepare(tmp, args.checkpoint)
        floor(onnx_file)
        image = np.random.default_rng(1).random(SHAPE, dtype=np.float32)
        encoded = bodies(image)
        print(f"bodies: JSON {len(encoded['json'][0]):,} bytes, binary {len(encoded['binary'][0]):,} bytes")
        proc, port = serve(tmp)
        try:
            for encoding, (body, headers) in encoded.items():  # warm-up, and a first check of each answer
                load(port, body, headers, encoding, 1, 2)
            print(f"{'clients':>7}  {'encoding':8}  {'requests/s':>10}  {'p50 ms':>7}  {'p99 ms':>7}")
            for k, clients in enumerate(args.clients):
                order = list(encoded) if k % 2 == 0 else list(reversed(encoded))
                for encoding in order:
                    body, headers = encoded[encoding]
                    lat = sorted(load(port, body, headers, encoding, clients, args.seconds))
                    p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(len(lat) * 0.99))]
                    print(f"{clients:>7}  {encoding:8}  {len(lat) / args.seconds:>10.1f}  {p50 * 1000:>7.1f}  "
                          f"{p99 * 1000:>7.1f}", flush=True)
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(30)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
