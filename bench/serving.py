"""Serving throughput and latency: our service against its floor, side by side, with wrk.

    python bench/serving.py [--seconds 10] [--rounds 3] [--product runs/product/best.pt] [--classifier runs/fmnist_cnn/best.pt]
    python bench/serving.py --store ~/bentoml     # the newest product and fashion-mnist models already registered there

Exports the two checkpoints into a temporary model store (or serves those of --store) and starts two `bentoml serve` processes on
127.0.0.1: our service (serve.service) and bench/floor_service.py, which does the same work minus the
model (the same typed models, middleware, limits and answer sizes, a constant for onnxruntime). Then,
in each round, every endpoint at 1 and 32 connections is loaded with wrk (`apt-get install wrk`) on one
service and then the other, alternating which goes first (ABAB), so a machine that speeds up or slows
down over the run moves both sides alike. Prints every run (requests/s, p50/p99 latency, non-2xx), the
ratio ours/floor of requests/s per round with its median and range, rows/s of /predict_batch (256
rows) over requests/s of /predict, and POST /v2/models/product/infer (1 and 256 rows) over the typed
/predict and /predict_batch.
"""

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from t2d.cpu import describe  # noqa: E402

BATCH_ROWS = 256
V2_INFER = "/v2/models/product/infer"


def bodies() -> dict[str, tuple[str, str]]:
    """label -> (path, body)."""
    rows = [[1 + (i % 9), 1 + ((i * 7) % 9) + 0.5] for i in range(BATCH_ROWS)]
    image = [[(r * 28 + c) % 256 for c in range(28)] for r in range(28)]

    def v2(x: list[list[float]]) -> str:
        return json.dumps({"inputs": [{"name": "x", "shape": [len(x), 2], "datatype": "FP32",
                                       "data": [v for row in x for v in row]}]})

    return {"/predict": ("/predict", json.dumps({"x1": 3.0, "x2": 4.0})),
            "/predict_batch": ("/predict_batch", json.dumps({"x": rows})),
            "/classify": ("/classify", json.dumps({"image": image})),
            "/v2 infer[1]": (V2_INFER, v2([[3.0, 4.0]])),
            f"/v2 infer[{BATCH_ROWS}]": (V2_INFER, v2(rows))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(service: str, cwd: Path, env: dict, log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(["bentoml", "serve", service, "--host", "127.0.0.1", "--port", str(port)], cwd=cwd,
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200:
                return proc, port
        except OSError:
            time.sleep(0.5)
    proc.kill()
    sys.exit(f"error: {service} did not become ready; log: {log}")


def wrk(url: str, body: str, connections: int, seconds: float, tmp: Path) -> dict:
    script = tmp / "post.lua"
    script.write_text(f'wrk.method = "POST"\nwrk.body = {json.dumps(body)}\n'
                      'wrk.headers["Content-Type"] = "application/json"\n')
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout

    def ms(label: str) -> float:
        value, unit = re.search(rf"^\s*{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1]), "p50_ms": ms("50%"), "p99_ms": ms("99%"),
            "non2xx": int(non2xx[1]) if non2xx else 0, "socket_errors": errors[1] if errors else ""}


def register(checkpoints: list[Path], env: dict, tmp: Path) -> None:
    for ckpt in checkpoints:
        subprocess.run([sys.executable, "-m", "export", "--checkpoint", str(ckpt), "--out", str(tmp / ckpt.parent.name)],
                       cwd=ROOT, env=env, check=True, capture_output=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=10, help="per wrk run (default: 10)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of every run on both services (default: 3)")
    p.add_argument("--product", type=Path, default=ROOT / "runs/product/best.pt")
    p.add_argument("--classifier", type=Path, default=ROOT / "runs/fmnist_cnn/best.pt")
    p.add_argument("--store", type=Path, help="a BentoML home whose newest product and fashion-mnist models to serve, "
                   "instead of exporting --product and --classifier (default: export them)")
    a = p.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("error: wrk not found; install it (apt-get install wrk)")
    print(f"CPU: {describe()}, {os.cpu_count()} cores; {a.rounds} rounds of {a.seconds} s per run")
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        env = {**os.environ, "BENTOML_HOME": str(a.store or tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
               "PYTHONPATH": str(ROOT)}
        if a.store is None:
            register([a.product, a.classifier], env, tmp)
        services = {"ours": ("serve.service:TrainToDeploy", ROOT), "floor": ("floor_service:Floor", ROOT / "bench")}
        started = {name: start(service, cwd, env, tmp / f"{name}.log") for name, (service, cwd) in services.items()}
        results: dict[tuple, list[dict]] = {}
        try:
            for round_ in range(a.rounds):
                order = ["ours", "floor"] if round_ % 2 == 0 else ["floor", "ours"]
                for endpoint, (path, body) in bodies().items():
                    for c in (1, 32):
                        for name in order:
                            r = wrk(f"http://127.0.0.1:{started[name][1]}{path}", body, c, a.seconds, tmp)
                            results.setdefault((name, endpoint, c), []).append(r)
                            print(f"round {round_ + 1} {name:<6} {endpoint:<16} c={c:<3} {r['rps']:9.1f} req/s  "
                                  f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  non-2xx {r['non2xx']}  "
                                  f"{r['socket_errors']}", flush=True)
        finally:
            for proc, _ in started.values():
                proc.terminate()
                proc.wait(timeout=30)
        print("\nours / floor requests/s, per round (median, range):")
        for endpoint in bodies():
            for c in (1, 32):
                ratios = [o["rps"] / f["rps"] for o, f in zip(results["ours", endpoint, c], results["floor", endpoint, c],
                                                             strict=True)]
                print(f"  {endpoint:<16} c={c:<3} {' '.join(f'{r:.2f}' for r in ratios)}  "
                      f"(median {statistics.median(ratios):.2f}, {min(ratios):.2f}-{max(ratios):.2f})")
        print("\nours, medians:")
        for c in (1, 32):
            med = {e: statistics.median(r["rps"] for r in results["ours", e, c]) for e in bodies()}
            print(f"  c={c:<3} rows/s of /predict_batch ({BATCH_ROWS} rows) over /predict requests/s: "
                  f"{med['/predict_batch'] * BATCH_ROWS / med['/predict']:.0f}x")
            batch = med[f"/v2 infer[{BATCH_ROWS}]"] / med["/predict_batch"]
            print(f"  c={c:<3} /v2 infer[1] over /predict requests/s: {med['/v2 infer[1]'] / med['/predict']:.2f}x; "
                  f"/v2 infer[{BATCH_ROWS}] over /predict_batch: {batch:.2f}x")
        non2xx = {k: sum(r["non2xx"] for r in v) for k, v in results.items() if any(r["non2xx"] for r in v)}
        print(f"non-2xx answers: {non2xx or 'none'}")


if __name__ == "__main__":
    main()
