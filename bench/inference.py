"""Per-call inference latency: eager PyTorch (what the reference scripts run) vs TorchScript vs onnxruntime.

    python bench/inference.py [--product runs/product/best.pt] [--classifier runs/fmnist_cnn/best.pt]

Exports each checkpoint with `export` (parity-checked, not registered) into a temporary folder,
then times one call at batch 1 and at batch 1024 for each runtime: median and p99 over repeated
calls after a warm-up, each runtime measured in turn in this process with the same thread
settings (torch's and onnxruntime's intra-op threads both = the number of cores). Prints a table
and each runtime's median as a ratio to eager (below 1 is faster).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from export import parity  # noqa: E402
from export.main import ExportOptions, verify_and_register, write_artifacts  # noqa: E402
from t2d.cpu import describe  # noqa: E402


def latencies(fn, x, seconds: float, min_calls: int = 20) -> list[float]:
    """Per-call seconds for `fn(x)`, after a warm-up, for about `seconds` of calls."""
    for _ in range(5):
        fn(x)
    times, deadline = [], time.perf_counter() + seconds
    while len(times) < min_calls or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return times


def runtimes(exported, threads: int) -> dict:
    eager, ts = exported.module, torch.jit.load(str(exported.files["torchscript"]))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(exported.files["onnx"]), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def torch_call(module):
        def call(x):
            with torch.inference_mode():
                return module(torch.from_numpy(x)).numpy()
        return call

    return {"eager": torch_call(eager), "torchscript": torch_call(ts),
            "onnxruntime": lambda x: session.run(None, {name: x})[0]}


def bench(label: str, checkpoint: Path, seconds: float, threads: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        opts = ExportOptions(checkpoint=checkpoint, out=Path(tmp), register=False, batch_sizes=[1, 7, 1024])
        exported = write_artifacts(opts)
        verify_and_register(exported, opts)  # parity first: timing a wrong model is meaningless
        run = runtimes(exported, threads)
        held_out = parity.held_out_inputs(exported.task, exported.ckpt, 1024, None).x.tensors[0].numpy()  # raw units
        for batch in (1, 1024):
            x = np.ascontiguousarray(held_out[:batch])
            medians = {}
            for name, fn in run.items():
                t = sorted(latencies(fn, x, seconds))
                medians[name] = statistics.median(t)
                p99 = t[min(len(t) - 1, int(0.99 * len(t)))]
                print(f"{label:<11} batch {batch:>4}  {name:<12} median {medians[name] * 1e6:9.1f} us  "
                      f"p99 {p99 * 1e6:9.1f} us  ({len(t)} calls)  x{medians[name] / medians['eager']:.2f} of eager")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--product", type=Path, default=ROOT / "runs/product/best.pt")
    p.add_argument("--classifier", type=Path, default=ROOT / "runs/fmnist_cnn/best.pt")
    p.add_argument("--seconds", type=float, default=2.0, help="timing per runtime and batch size (default: 2)")
    a = p.parse_args()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    print(f"CPU: {describe()}; torch {torch.__version__}, onnxruntime {ort.__version__}, {threads} threads, "
          f"{os.cpu_count()} cores")
    for label, path in (("product", a.product), ("classifier", a.classifier)):
        if path.exists():
            bench(label, path, a.seconds, threads)
        else:
            print(f"{label}: no checkpoint at {path}; skipped")


if __name__ == "__main__":
    main()
