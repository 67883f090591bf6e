"""int8 and fp16 against float32: test accuracy (or MRE), file size and onnxruntime latency, side by side.

    python bench/quantize.py runs/fmnist_cnn/best.pt runs/fmnist_mlp/best.pt runs/product/best.pt
    python bench/quantize.py runs/fmnist_cnn/best.pt --profile      # + time per op type, each model
    python bench/quantize.py runs/product/best.pt --explore         # + the int8 options export did not pick

For each checkpoint: `python -m export --quantize int8` in both int8 formats (portable, the default, and
vnni) and `--quantize fp16` (parity and the gate included, nothing registered) into a temporary folder;
the gate's numbers come from quantization.json. The CPU (model and the flags that matter: AVX2, AVX-512,
VNNI, AMX) is printed first: int8 speed and, for the vnni format, int8 answers depend on it.
Latency: one onnxruntime session per model, all with the same intra-op threads; rounds alternate
between the models (float32, int8, fp16, float32, ...) so that load from other processes on a shared
machine falls on all of them alike; each round times `--calls` calls per model; the figure is the
median over all calls, and the ratio is to float32's median.

--explore quantizes the same float32 file with the options export did not choose (static vs dynamic,
per-channel vs per-tensor weights, int8 vs uint8 activations, calibration size) and measures each on
the same test split, to show why export uses what it uses.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from export.main import main as export_main  # noqa: E402
from export.quantize import _Calibration, calibration_inputs, fold_batchnorm_through_maxpool, measure, predict, \
    session, held_out_data  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from t2d.cpu import describe as describe_cpu  # noqa: E402


def export(checkpoint: Path, out: Path, variant: str, extra: list[str]) -> dict:
    code = export_main(["--checkpoint", str(checkpoint), "--out", str(out), "--format", "onnx", "--no-register",
                        "--quantize", variant, *extra])
    report = json.loads((out / "quantization.json").read_text())
    report["exit"] = code
    return report


def timings(sessions: dict[str, ort.InferenceSession], x: np.ndarray, rounds: int, calls: int) -> dict[str, list]:
    name = {k: s.get_inputs()[0].name for k, s in sessions.items()}
    for k, s in sessions.items():  # warm-up
        for _ in range(3):
            s.run(None, {name[k]: x})
    times = defaultdict(list)
    for _ in range(rounds):
        for k, s in sessions.items():
            feed = {name[k]: x}
            for _ in range(calls):
                t0 = time.perf_counter()
                s.run(None, feed)
                times[k].append(time.perf_counter() - t0)
    return times


def profile(path: Path, x: np.ndarray, threads: int, calls: int) -> dict[str, float]:
    """Microseconds per call by op type (onnxruntime's profiler, node events), the first (warm-up) call left out."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "p")
        s = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feed = {s.get_inputs()[0].name: x}
        for _ in range(calls + 1):
            s.run(None, feed)
        events = json.loads(Path(s.end_profiling()).read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")[1:]
    # The first call packs weights and allocates: not what a serving call costs. Per op type, the median over
    # the other calls: one call preempted by another process on a shared machine would swamp a mean.
    per_run = [defaultdict(float) for _ in runs]
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            for i, (start, end) in enumerate(runs):
                if start <= e["ts"] <= end:
                    per_run[i][e["args"]["op_name"]] += e["dur"]
    ops = {op for r in per_run for op in r}
    by_op = {op: statistics.median(r.get(op, 0.0) for r in per_run) for op in ops}
    return dict(sorted(by_op.items(), key=lambda kv: -kv[1]))


def explore(checkpoint: Path, float_file: Path, tmp: Path, threads: int) -> None:
    """int8 options side by side on the same float32 file, calibration sample and test split."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, \
        quantize_dynamic, quantize_static

    task, ckpt = _task_ckpt(checkpoint)
    test = held_out_data(task, ckpt, None)
    x, y = test.feeds[task.input.name], test.y
    ref = predict(session(float_file), x, 1024)
    pre, folded = tmp / "pre.onnx", tmp / "folded.onnx"
    model = onnx.load(str(float_file))
    fold_batchnorm_through_maxpool(model)  # as export does
    onnx.save(model, str(folded))
    quant_pre_process(str(folded), str(pre))
    plain = tmp / "plain.onnx"
    quant_pre_process(str(float_file), str(plain))
    name = task.input.name
    options = {
        "dynamic U8S8, per-tensor": dict(kind="dynamic", per_channel=False),
        "dynamic U8S8, per-channel (vnni)": dict(kind="dynamic", per_channel=True),
        "dynamic U8S8, per-channel, reduce_range": dict(kind="dynamic", per_channel=True, rr=True),
        "dynamic U8U8, per-channel (portable)": dict(kind="dynamic", per_channel=True, weight=QuantType.QUInt8),
        "static S8S8, per-channel, 512 calib, BatchNorm not folded": dict(kind="static", per_channel=True,
                                                                          act=QuantType.QInt8, n=512, nofold=True),
        "static S8S8, per-channel, 512 calib (vnni)": dict(kind="static", per_channel=True, act=QuantType.QInt8,
                                                           n=512),
        "static S8S8, per-channel, 512 calib, reduce_range (portable)": dict(kind="static", per_channel=True,
                                                                             act=QuantType.QInt8, n=512, rr=True),
        "static U8U8, per-channel, 512 calib": dict(kind="static", per_channel=True, act=QuantType.QUInt8,
                                                    weight=QuantType.QUInt8, n=512),
        "static S8S8, per-tensor, 512 calib": dict(kind="static", per_channel=False, act=QuantType.QInt8, n=512),
        "static U8S8, per-channel, 512 calib": dict(kind="static", per_channel=True, act=QuantType.QUInt8, n=512),
        "static S8S8, per-channel, 128 calib": dict(kind="static", per_channel=True, act=QuantType.QInt8, n=128),
        "static S8S8, per-channel, 2048 calib": dict(kind="static", per_channel=True, act=QuantType.QInt8, n=2048),
        "static S8S8, per-channel, 512 calib, percentile": dict(kind="static", per_channel=True, act=QuantType.QInt8,
                                                                n=512, method=CalibrationMethod.Percentile),
    }
    print(f"  explore ({len(x)} test samples; float32 {describe(task.kind, measure(task.kind, y, ref, ref), 'float')})")
    for label, o in options.items():
        path = tmp / "explore.onnx"
        weight, rr = o.get("weight", QuantType.QInt8), o.get("rr", False)
        if o["kind"] == "dynamic":
            quantize_dynamic(str(pre), str(path), weight_type=weight, per_channel=o["per_channel"], reduce_range=rr)
        else:
            calib, _ = calibration_inputs(task, ckpt, o["n"], None)
            quantize_static(str(plain if o.get("nofold") else pre), str(path), _Calibration({name: calib}),
                            quant_format=QuantFormat.QDQ, per_channel=o["per_channel"], activation_type=o["act"],
                            weight_type=weight, reduce_range=rr,
                            calibrate_method=o.get("method", CalibrationMethod.MinMax))
        s = session(path, threads)
        t = timings({"float32": session(float_file, threads), "option": s}, np.ascontiguousarray(x[:1024]), 4, 5)
        speed = statistics.median(t["option"]) / statistics.median(t["float32"])
        for batch in ([1, 1024] if o["kind"] == "dynamic" else [1024]):
            m = measure(task.kind, y, ref, predict(s, x, batch))
            print(f"  {label:<58} batch {batch:>4}: {describe(task.kind, m, 'quantized')}, "
                  f"{path.stat().st_size / 1024:.0f} KiB, latency at batch 1024 x{speed:.2f} of float32")


def describe(kind: str, m: dict, which: str) -> str:
    if kind == "classification":
        return f"accuracy {m[f'{which}_accuracy']:.2f}%, argmax agreement {m['agreement']:.2%}"
    return (f"MRE {m[f'{which}_mre']:.4f}%, rows within 1% {m['agreement']:.2%}, "
            f"max rel diff {m['max_rel_diff']:.3g}")


def bench(checkpoint: Path, a, threads: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        reports = {"int8": export(checkpoint, tmp / "int8", "int8", a.export_args),
                   "int8-vnni": export(checkpoint, tmp / "int8-vnni", "int8", ["--int8-format", "vnni",
                                                                                *a.export_args]),
                   "fp16": export(checkpoint, tmp / "fp16", "fp16", a.export_args)}
        files = {"float32": tmp / "int8" / "model.onnx", "int8": tmp / "int8" / "model.int8.onnx",
                 "int8-vnni": tmp / "int8-vnni" / "model.int8.onnx", "fp16": tmp / "fp16" / "model.fp16.onnx"}
        print(f"\n{checkpoint}")
        for v, r in reports.items():
            g = r["gate"]
            cost = (f"accuracy {g['float_accuracy']:.2f}% -> {g['quantized_accuracy']:.2f}% "
                    f"({-g['accuracy_drop']:+.2f} points), argmax agreement {g['agreement']:.2%}"
                    if "accuracy_drop" in g else
                    f"MRE {g['float_mre']:.4f}% -> {g['quantized_mre']:.4f}% ({g['error_increase']:+.1f}%), "
                    f"rows within 1% {g['agreement']:.2%}, max rel diff {g['max_rel_diff']:.3g}")
            kept = [k["module"] or k["node"] for k in r.get("kept_float") or []]
            cost += f", kept float32: {', '.join(kept)}" if kept else ""
            print(f"  {v}: {r['method']}, gate {'passed' if r['passed'] else 'REFUSED'} (exit {r['exit']}) on "
                  f"{r['eval_data']['samples']} test samples at batch {g['batch']}: {cost}")
        for k, f in files.items():
            print(f"  {k:<8} {f.stat().st_size:>9,} bytes  x{f.stat().st_size / files['float32'].stat().st_size:.3f}")
        sessions = {k: session(f, threads) for k, f in files.items()}
        task, ckpt = _task_ckpt(checkpoint)
        x_all = held_out_data(task, ckpt, None).feeds[task.input.name]
        for batch in (1, 1024):
            x = np.ascontiguousarray(x_all[:batch])
            calls = a.calls if batch > 1 else a.calls * 20
            times = timings(sessions, x, a.rounds, calls)
            base = statistics.median(times["float32"])
            for k, t in times.items():
                t = sorted(t)
                med = statistics.median(t)
                p90 = t[int(0.9 * len(t))]
                print(f"  batch {batch:>4} {k:<8} median {med * 1e6:10.1f} us  p90 {p90 * 1e6:10.1f} us"
                      f"  ({len(t)} calls)  x{med / base:.2f} of float32")
            if a.profile:
                for k, f in files.items():
                    ops = profile(f, x, threads, 5 if batch > 1 else 50)
                    total = sum(ops.values())
                    top = ", ".join(f"{op} {us:.0f}" for op, us in list(ops.items())[:8])
                    print(f"  profile batch {batch:>4} {k:<8} {total:9.0f} us in kernels: {top}")
        if a.explore:
            explore(checkpoint, files["float32"], tmp, threads)


def _task_ckpt(checkpoint: Path):
    from export.main import ExportOptions, task_of

    ckpt = load_checkpoint(checkpoint)
    return task_of(ckpt, ExportOptions(checkpoint=checkpoint)), ckpt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", type=Path, nargs="+")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="onnxruntime intra-op threads, every model (default: the number of cores)")
    p.add_argument("--rounds", type=int, default=10, help="alternating rounds (default: 10)")
    p.add_argument("--calls", type=int, default=10, help="calls per model per round at batch 1024; x20 at batch 1 "
                                                         "(default: 10)")
    p.add_argument("--profile", action="store_true", help="also time each op type with onnxruntime's profiler")
    p.add_argument("--explore", action="store_true", help="also measure the int8 options export did not pick")
    p.add_argument("--export-args", nargs=argparse.REMAINDER, default=[], help="passed on to python -m export")
    a = p.parse_args()
    print(f"onnxruntime {ort.__version__}, {a.threads} intra-op threads, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(f"CPU: {describe_cpu()}")
    for checkpoint in a.checkpoints:
        bench(checkpoint, a, a.threads)


if __name__ == "__main__":
    main()
