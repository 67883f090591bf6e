"""Quantized ONNX variants of a parity-checked float32 export, each behind a measured accuracy gate.

    python -m export --quantize int8 --checkpoint runs/fmnist_cnn/best.pt      # model.int8.onnx
    python -m export --quantize fp16 --checkpoint runs/product/best.pt         # model.fp16.onnx

int8 uses onnxruntime's own tools: `quant_pre_process` (shape inference and graph optimization)
first (and, for CNNs that pool before BatchNorm, the BatchNorm folded into the convolution where that
is exact: `fold_batchnorm_through_maxpool`), then
  static   QDQ quantization, activations and weights int8, weights per output channel, activation
           ranges calibrated (MinMax) on a seeded sample of the task's *training* split; what the
           classifiers get;
  dynamic  int8 weights, activation ranges computed per batch at run time; what regression gets,
           because static activation ranges cost tiny regression MLPs several times their error
           (BENCHMARKS.md). A dynamic model's answer for a row depends a little on the other rows in
           its batch, so the gate evaluates it at batch 1 and at batch 1024.
fp16 converts weights and arithmetic to float16 and keeps float32 inputs and outputs, so the
contract and the serving code stay the same (onnxruntime's float16 converter, keep_io_types=True).

The gate runs the float32 and the quantized file in onnxruntime on the same held-out data (the
task's whole test split) and passes only if the quantized model loses at most `max_accuracy_drop`
points of accuracy (classifiers) or its mean relative error is at most (1 + `max_error_increase`%)
times the float model's (regression). Either way the numbers go to quantization.json.
"""

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

import t2d
from export.artifacts import ExportError, save_onnx
from models.checkpoint import first_line
from t2d.files import write_json
from t2d.splits import split_tensors

VARIANTS = ("int8", "fp16")
METHODS = ("auto", "static", "dynamic")
QUANT_FILE = "quantization.json"
CALIBRATION_SEED = 20261203  # the calibration sample: reproducible, and none of the training or test seeds
CALIBRATION_SAMPLES = 512  # MinMax ranges of a few hundred samples: 512 and 2048 scored the same (BENCHMARKS.md)
CALIBRATION_BATCH = 64
EVAL_BATCH = 1024
AGREE_REL = 0.01  # regression agreement: a row agrees when |quantized - float| <= 1% of |float|


class GateError(Exception):
    """The quantized model lost more than the bound allows; the message is one line with the numbers."""


class QuantizeDataError(ValueError):
    """The task's data, needed to calibrate or to measure, cannot be had here (a user error: exit 2)."""


@dataclass
class QuantizeOptions:
    variant: str  # int8 | fp16
    method: str = "auto"  # int8: auto (static for classifiers, dynamic for regression) | static | dynamic
    calibration_samples: int = CALIBRATION_SAMPLES
    max_accuracy_drop: float = 0.5  # classifiers: points of test accuracy
    max_error_increase: float = 10.0  # regression: % increase of the mean relative error


def variant_file(variant: str) -> str:
    return f"model.{variant}.onnx"


def int8_method(task: t2d.Task, method: str) -> str:
    if method != "auto":
        return method
    return "dynamic" if task.regression else "static"


# --- data: calibration from the training split, measurement on the test split -------------------------------


def _splits(task: t2d.Task, ckpt: dict[str, Any], data_dir: str | None, why: str) -> t2d.Splits:
    try:
        return task.data(t2d.DataOptions.from_config(ckpt.get("config") or {}, dir=data_dir, download=False))
    except Exception as e:  # no files here, a broken loader: the user can fix it, there is nothing to measure
        raise QuantizeDataError(f"--quantize needs task {task.name}'s data to {why}, and loading it failed: "
                                f"{first_line(e)[:200]} (pass --data-dir)") from None


def _checked(task: t2d.Task, split: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) as training checks them; a malformed split is the user's one-line error, as in training."""
    try:
        return split_tensors(task, split, name)
    except t2d.DataError as e:
        raise QuantizeDataError(str(e)) from None


def calibration_inputs(task: t2d.Task, ckpt: dict[str, Any], n: int, data_dir: str | None,
                       seed: int = CALIBRATION_SEED) -> tuple[np.ndarray, str]:
    """n raw inputs drawn (seeded, without replacement) from the task's training split, and a description.

    Only `Splits.train` is touched: the test split is what the gate measures on, and calibrating on
    it would make the measurement flatter the quantized model."""
    train = _splits(task, ckpt, data_dir, "calibrate").train
    size = len(train[0]) if isinstance(train, (tuple, list)) and len(train) == 2 else len(train)
    pick = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n].sort().values
    if isinstance(train, (tuple, list)):
        sample = tuple(torch.as_tensor(np.asarray(v))[pick] for v in train)
    else:
        sample = torch.utils.data.Subset(train, pick.tolist())
    x, _ = _checked(task, sample, "train")
    return x.numpy(), f"{len(x)} of {size} samples of the training split, seed {seed}"


def held_out_data(task: t2d.Task, ckpt: dict[str, Any], data_dir: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """The task's whole test split as arrays (x, y), and a description."""
    x, y = _checked(task, _splits(task, ckpt, data_dir, "measure the quantized model").test, "test")
    return x.numpy(), y.numpy(), f"the whole test split of task {task.name} ({len(x)} samples)"


# --- writing the quantized file -------------------------------------------------------------------------------


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over a fixed array: batches, then None."""

    def __init__(self, name: str, x: np.ndarray, batch: int = CALIBRATION_BATCH):
        self.feeds = [{name: x[i:i + batch]} for i in range(0, len(x), batch)]
        self.rewind()

    def get_next(self):
        return next(self.batches, None)

    def rewind(self):
        self.batches = iter(self.feeds)


def fold_batchnorm_through_maxpool(model: onnx.ModelProto) -> int:
    """Rewrite Conv -> MaxPool -> BatchNormalization [-> Relu] as Conv' -> Relu -> MaxPool, where Conv' has the
    BatchNorm folded into its weights; returns how many were rewritten.

    Exact where every channel's BatchNorm scale gamma / sqrt(var + eps) is positive: a per-channel increasing
    affine map, and Relu, commute with a max. The CNN's `pool_first` blocks (pooling before BatchNorm, cheaper
    to train) otherwise leave a float BatchNorm between two int8 convolutions, which onnxruntime runs by
    dequantizing, normalizing, requantizing and transposing back and forth (~20% of the int8 CNN's time,
    measured); folded, each block is one int8 convolution with its Relu fused."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producer = {o: n for n in g.node for o in n.output}
    graph_outputs = {o.name for o in g.output}
    folded = 0
    for bn in [n for n in g.node if n.op_type == "BatchNormalization"]:
        pool = producer.get(bn.input[0])
        conv = producer.get(pool.input[0]) if pool is not None and pool.op_type == "MaxPool" else None
        if conv is None or conv.op_type != "Conv" or len(bn.output) != 1 or len(pool.output) != 1:
            continue
        if any(a.name == "training_mode" and a.i for a in bn.attribute):
            continue
        if len(consumers.get(conv.output[0], [])) != 1 or len(consumers.get(pool.output[0], [])) != 1 \
                or {conv.output[0], pool.output[0]} & graph_outputs:
            continue
        if not all(i in inits for i in bn.input[1:5]) or conv.input[1] not in inits \
                or len(consumers.get(conv.input[1], [])) != 1:
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        scale = gamma / np.sqrt(var + eps)
        if not (scale > 0).all():
            continue  # a decreasing channel does not commute with max
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] \
            else np.zeros(w.shape[0])
        w_name, b_name = conv.input[1], f"{conv.name or conv.output[0]}_folded_bias"
        inits[w_name].CopyFrom(numpy_helper.from_array((w * scale.reshape(-1, *[1] * (w.ndim - 1))).astype(np.float32),
                                                       w_name))
        g.initializer.append(numpy_helper.from_array(((b - mean) * scale + beta).astype(np.float32), b_name))
        if len(conv.input) > 2:
            conv.input[2] = b_name
        else:
            conv.input.append(b_name)
        # Conv' -> MaxPool -> BN_out becomes Conv' -> Relu? -> MaxPool, keeping the tensor names downstream reads.
        after = consumers.get(bn.output[0], [])
        relu = after[0] if len(after) == 1 and after[0].op_type == "Relu" and bn.output[0] not in graph_outputs \
            else None
        end = relu.output[0] if relu is not None else bn.output[0]
        if relu is not None:
            relu.input[0], relu.output[0] = conv.output[0], f"{conv.output[0]}_relu"
            pool.input[0] = relu.output[0]
        pool.output[0] = end
        g.node.remove(bn)
        folded += 1
    if folded:
        used = {i for n in g.node for i in n.input}
        unused = [t for t in g.initializer if t.name not in used]
        for t in unused:
            g.initializer.remove(t)
        _sort_nodes(g)
    return folded


def write_int8(float_file: Path, path: Path, input_name: str, method: str, calibration: np.ndarray | None) -> dict:
    """Preprocess, then quantize `float_file` to `path` (a temporary file; the caller makes it final)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, \
        quantize_dynamic, quantize_static

    pre = path.with_name("pre.onnx")
    model = onnx.load(str(float_file))
    folded = fold_batchnorm_through_maxpool(model)
    if folded:
        folded_file = path.with_name("folded.onnx")
        onnx.save(model, str(folded_file))
        if calibration is not None:  # the rewrite is exact in real arithmetic: check it in float32 before going on
            want, got = (predict(session(f), calibration, CALIBRATION_BATCH) for f in (float_file, folded_file))
            err = float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))
            if not err <= 1e-4:
                raise ExportError(f"folding BatchNorm into the convolutions changed the float outputs by {err:.2g}")
        float_file = folded_file
    quant_pre_process(str(float_file), str(pre))  # symbolic shape inference + onnxruntime graph optimizations
    if method == "static":
        # S8S8 QDQ (onnxruntime's recommended default on x86 with VNNI); symmetric int8 weights per output channel.
        quantize_static(str(pre), str(path), _Calibration(input_name, calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        return {"method": "static", "format": "QDQ", "activations": "int8, per tensor, calibrated (MinMax)",
                "weights": "int8 symmetric, per output channel", "preprocess": "quant_pre_process",
                "batchnorm_folded_through_maxpool": folded}
    # Dynamic: onnxruntime quantizes activations per batch (uint8) and weights per output channel (int8):
    # per channel halved the product MLP's added error against per tensor (BENCHMARKS.md).
    quantize_dynamic(str(pre), str(path), weight_type=QuantType.QInt8, per_channel=True)
    return {"method": "dynamic", "activations": "uint8, per tensor, range computed per batch at run time",
            "weights": "int8 symmetric, per output channel", "preprocess": "quant_pre_process",
            "batchnorm_folded_through_maxpool": folded}


def write_fp16(float_file: Path, path: Path) -> dict:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(float_file)), keep_io_types=True)
    _sort_nodes(model.graph)  # the converter appends its input Casts after the nodes that read them
    onnx.save(model, str(path))
    return {"method": "fp16", "weights": "float16", "io": "float32 (Cast nodes at the graph's edges)"}


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Order `graph`'s nodes so each comes after the producers of its inputs (ONNX requires it; Kahn's order,
    stable: nodes keep their relative order where the data allow)."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise ExportError("the fp16 graph has a cycle or an input nothing produces")
        for n in ready:
            known.update(n.output)
        ordered += ready
        pending = [n for n in pending if not any(n is r for r in ready)]
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)


def write_variant(float_file: Path, out: Path, variant: str, contract: dict[str, Any], method: str,
                  calibration: np.ndarray | None) -> tuple[Path, dict]:
    """Write `out/model.<variant>.onnx` atomically, with the variant's contract in its metadata."""
    path = out / variant_file(variant)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        raw = Path(tmp) / "q.onnx"
        try:
            details = (write_int8(float_file, raw, contract["inputs"][0]["name"], method, calibration)
                       if variant == "int8" else write_fp16(float_file, raw))
        except Exception as e:  # onnxruntime's tools raise anything from AssertionError to RuntimeError
            raise ExportError(f"{variant} quantization failed: {first_line(e)[:300]}") from None
        model = onnx.load(str(raw), load_external_data=False)
    props = {p.key: p.value for p in onnx.load(str(float_file), load_external_data=False).metadata_props}
    props["contract"] = json.dumps(contract)
    props["variant"] = variant
    del model.metadata_props[:]  # the float model's, with this variant's contract instead
    save_onnx(model, path, props, full_check=False)
    return path, details


# --- measuring ------------------------------------------------------------------------------------------------


def session(path: Path, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def predict(sess, x: np.ndarray, batch: int) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def check_io(sess, contract: dict[str, Any], variant: str) -> None:
    """What the server relies on: the contract's input and output names, float32 at both ends."""
    (inp,), (out,) = contract["inputs"], contract["outputs"]
    got = [(i.name, i.type) for i in sess.get_inputs()], [(o.name, o.type) for o in sess.get_outputs()]
    want = [(inp["name"], "tensor(float)")], [(out["name"], "tensor(float)")]
    if got != want:
        raise ExportError(f"the {variant} model's inputs and outputs are {got}, the contract says {want}")


def measure(kind: str, y: np.ndarray, ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """The float model's outputs `ref` and the quantized model's `got` on the same inputs, against the truth `y`."""
    if kind == "classification":
        return {"float_accuracy": 100 * float((ref.argmax(1) == y).mean()),
                "quantized_accuracy": 100 * float((got.argmax(1) == y).mean()),
                "agreement": float((ref.argmax(1) == got.argmax(1)).mean())}
    ref, got, y = (a.astype(np.float64) for a in (ref, got, y))
    rel = np.abs(got - ref) / np.maximum(np.abs(ref), 1e-12)
    return {"float_mre": 100 * float((np.abs(ref - y) / np.abs(y)).mean()),
            "quantized_mre": 100 * float((np.abs(got - y) / np.abs(y)).mean()),
            "agreement": float((rel <= AGREE_REL).mean()), "max_rel_diff": float(rel.max())}


def worst(kind: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    key = (lambda r: r["quantized_accuracy"]) if kind == "classification" else (lambda r: -r["quantized_mre"])
    return min(results, key=key)


def gate(kind: str, m: dict[str, Any], q: QuantizeOptions) -> dict[str, Any]:
    """Whether the measured cost `m` is within the bound; adds delta and bound to a copy of `m`."""
    m = dict(m)
    if kind == "classification":
        m["accuracy_drop"] = m["float_accuracy"] - m["quantized_accuracy"]  # points; negative: it gained
        m["max_accuracy_drop"] = q.max_accuracy_drop
        m["passed"] = bool(m["accuracy_drop"] <= q.max_accuracy_drop + 1e-9)
    else:
        m["error_increase"] = 100 * (m["quantized_mre"] / m["float_mre"] - 1) if m["float_mre"] > 0 else (
            0.0 if m["quantized_mre"] == 0 else float("inf"))  # %; negative: it improved
        m["max_error_increase"] = q.max_error_increase
        m["passed"] = bool(m["quantized_mre"] <= (1 + q.max_error_increase / 100) * m["float_mre"] + 1e-12)
    return m


def failure_message(variant: str, report: dict[str, Any]) -> str:
    g = report["gate"]
    if "accuracy_drop" in g:
        numbers = (f"test accuracy {g['quantized_accuracy']:.2f}% vs float32 {g['float_accuracy']:.2f}%: "
                   f"{g['accuracy_drop']:.2f} points lost > --max-accuracy-drop {g['max_accuracy_drop']:g}; "
                   f"argmax agrees on {g['agreement']:.2%}")
    else:
        numbers = (f"test MRE {g['quantized_mre']:.4g}% vs float32 {g['float_mre']:.4g}%: "
                   f"+{g['error_increase']:.1f}% > --max-error-increase {g['max_error_increase']:g}%; "
                   f"{g['agreement']:.2%} of rows within 1%, max rel diff {g['max_rel_diff']:.3g}")
    return f"{variant} model refused: {numbers} at batch {g['batch']} on {report['eval_data']['samples']} test samples"


def quantize(task: t2d.Task, ckpt: dict[str, Any], contract: dict[str, Any], float_file: Path, out: Path,
             q: QuantizeOptions, data_dir: str | None) -> dict[str, Any]:
    """Write the variant, measure it against the float32 file, write quantization.json; returns the report
    (report["passed"] says whether the gate held; report["file"] is the variant's file)."""
    contract = {**contract, "variant": q.variant}
    method, calibration, calib_source = q.variant, None, None
    if q.variant == "int8":
        method = int8_method(task, q.method)
        if method == "static":
            calibration, calib_source = calibration_inputs(task, ckpt, q.calibration_samples, data_dir)
    t0 = time.perf_counter()
    path, details = write_variant(float_file, out, q.variant, contract, method, calibration)
    seconds = time.perf_counter() - t0
    x, y, eval_source = held_out_data(task, ckpt, data_dir)  # after calibration, which reads only the training split
    ref_sess, q_sess = session(float_file), session(path)
    check_io(q_sess, contract, q.variant)
    # A static or fp16 graph computes each row alone; a dynamic one scales activations per batch, so a row's
    # answer depends on its batch: measure alone and in a full batch, and gate on the worse.
    batches = [1, EVAL_BATCH] if method == "dynamic" else [EVAL_BATCH]
    results = []
    for batch in batches:
        m = measure(task.kind, y, predict(ref_sess, x, EVAL_BATCH), predict(q_sess, x, batch))
        results.append({**m, "batch": batch})
    g = gate(task.kind, worst(task.kind, results), q)
    report = {
        "variant": q.variant, "passed": g["passed"], "file": str(path), "contract_variant": q.variant,
        **details,
        "calibration": None if calibration is None else {"split": "train", "source": calib_source,
                                                         "samples": len(calibration), "seed": CALIBRATION_SEED},
        "eval_data": {"source": eval_source, "samples": len(x), "batches": batches},
        "gate": g, "by_batch": results,
        "size_bytes": {"float32": float_file.stat().st_size, q.variant: path.stat().st_size,
                       "ratio": path.stat().st_size / float_file.stat().st_size},
        "quantize_seconds": round(seconds, 2),
    }
    write_json(out / QUANT_FILE, report)
    return report


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the store entry's metadata carries (the full report is quantization.json in the entry)."""
    keys = ("variant", "method", "activations", "weights", "calibration", "eval_data", "gate", "size_bytes")
    return {k: report[k] for k in keys if k in report}
