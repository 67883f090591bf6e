"""Quantized ONNX variants of a parity-checked float32 export, each behind a measured accuracy gate.

    python -m export --quantize int8 --checkpoint runs/fmnist_cnn/best.pt      # model.int8.onnx
    python -m export --quantize fp16 --checkpoint runs/product/best.pt         # model.fp16.onnx

int8 uses onnxruntime's own tools: `quant_pre_process` (shape inference and graph optimization)
first (and, for CNNs that pool before BatchNorm, the BatchNorm folded into the convolution where that
is exact: `fold_batchnorm_through_maxpool`), then
  static   QDQ quantization, weights per output channel, activation ranges calibrated (MinMax) on a
           seeded sample of the task's *training* split; what the classifiers get;
  dynamic  int8 weights, activation ranges computed per batch at run time; what regression gets,
           because static activation ranges cost tiny regression MLPs several times their error
           (BENCHMARKS.md), and models that take ids (a Transformer's MatMuls). A dynamic model's
           answer for a row depends a little on the other rows in its batch, so the gate evaluates it
           at batch 1 and at batch 1024.

The int8 format (`--int8-format`) decides which CPUs give the answers the gate measured:
  portable (default)  right on every x86-64 CPU. Without VNNI (an int8 dot product: avx512_vnni,
           avx_vnni, amx_int8), onnxruntime multiplies uint8 activations by int8 weights with an
           instruction that adds pairs of products into int16 and saturates; 7-bit weights
           (reduce_range) keep every pair in range for static models, and dynamic models take uint8
           weights, whose kernel widens before it adds. (On an AVX2-only CPU the full 8-bit formats
           lost 1.5 accuracy points on the CNN and quadrupled the product MLP's error: BENCHMARKS.md.)
  vnni     full 8-bit int8 weights, for CPUs with VNNI only; the variant records that it needs VNNI,
           and a server on a CPU without it refuses to serve it.

fp16 converts weights and arithmetic to float16 and keeps float32 inputs and outputs, so the
contract and the serving code stay the same (onnxruntime's float16 converter, keep_io_types=True).

Per-layer fallback (`export.keep_float`): the layers `--keep-float` names stay float32; then, unless
`--no-int8-fallback`, a variant that misses the bound on a validation sample of the *training* split
keeps the fewest further layers float that bring it within the bound.

The gate runs the float32 and the quantized file in onnxruntime on the same held-out data (the
task's whole test split, read once) and passes only if the quantized model loses at most
`max_accuracy_drop` points of accuracy (classifiers) or its mean relative error is at most
(1 + `max_error_increase`%) times the float model's (regression). Either way the numbers go to
quantization.json, with the CPU they were measured on and the latency of both models on it. A
variant that passes also gets its self-check sample (`t2d.selfcheck`), which the server runs at load.
"""

import contextlib
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

import t2d
from export import keep_float
from export.artifacts import ExportError, save_onnx
from models.checkpoint import first_line
from t2d import selfcheck
from t2d.cpu import cpu_info
from t2d.files import atomic_write, write_json
from t2d.splits import split_tensors

VARIANTS = ("int8", "fp16")
METHODS = ("auto", "static", "dynamic")
INT8_FORMATS = ("portable", "vnni")
QUANT_FILE = "quantization.json"
CALIBRATION_SEED = 20261203  # the calibration sample: reproducible, and none of the training or test seeds
CALIBRATION_SAMPLES = 512  # MinMax ranges of a few hundred samples: 512 and 2048 scored the same (BENCHMARKS.md)
VALIDATION_SAMPLES = 1024  # the per-layer selection's sample, from the training rows calibration left
MIN_VALIDATION = 64  # fewer rows left than this: validate on the first rows of the same shuffle instead
CALIBRATION_BATCH = 64
EVAL_BATCH = 1024
AGREE_REL = selfcheck.AGREE_REL  # regression agreement: a row agrees when |quantized - float| <= 1% of |float|
ORT_TYPES = {"float32": "tensor(float)", "int64": "tensor(int64)", "bool": "tensor(bool)"}
LATENCY_SECONDS = 0.3  # per model and batch size: a figure for the report, not a benchmark (bench/quantize.py)


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
    int8_format: str = "portable"  # portable | vnni
    keep_float: tuple[str, ...] = ()  # layers (module paths or node names) to leave in float32
    fallback: bool = True  # select further float layers on validation when the variant misses the bound


def variant_file(variant: str) -> str:
    return f"model.{variant}.onnx"


def int8_method(task: t2d.Task, method: str) -> str:
    """static for image and vector classifiers; dynamic for regression, and for models that take ids (token or
    category models: Transformers' activation ranges vary too much from input to input to calibrate once)."""
    if method != "auto":
        return method
    return "dynamic" if task.regression or any(i.dtype != "float32" for i in task.inputs) else "static"


# --- data: calibration and validation from the training split, measurement on the test split ----------------


def _splits(task: t2d.Task, ckpt: dict[str, Any], data_dir: str | None, why: str) -> t2d.Splits:
    try:
        return task.data(t2d.DataOptions.from_config(ckpt.get("config") or {}, dir=data_dir, download=False))
    except Exception as e:  # no files here, a broken loader: the user can fix it, there is nothing to measure
        raise QuantizeDataError(f"--quantize needs task {task.name}'s data to {why}, and loading it failed: "
                                f"{first_line(e)[:200]} (pass --data-dir)") from None


def _checked(task: t2d.Task, split: Any, name: str) -> tuple[Any, torch.Tensor]:
    """(x, y) as training checks them; a malformed split is the user's one-line error, as in training."""
    try:
        return split_tensors(task, split, name)
    except t2d.DataError as e:
        raise QuantizeDataError(str(e)) from None


def _rows(split: Any, pick: torch.Tensor) -> Any:
    """The rows `pick` of a split, reading only those (a Dataset's other samples are never touched)."""
    if isinstance(split, (tuple, list)):
        return tuple(_take(v, pick.tolist()) for v in split)
    return torch.utils.data.Subset(split, pick.tolist())


def _take(values: Any, rows: list[int]) -> Any:
    """The rows of a split's inputs or targets, in whatever form the task gives them (tensors, arrays, lists of
    per-sample values or strings, dicts or tuples of those)."""
    if isinstance(values, dict):
        return {k: _take(v, rows) for k, v in values.items()}
    if isinstance(values, torch.Tensor):
        return values[rows]
    if isinstance(values, np.ndarray):
        return values[rows]
    if isinstance(values, tuple) and values and not isinstance(values[0], (str, int, float)):
        return tuple(_take(v, rows) for v in values)  # several inputs, in the task's order
    return [values[i] for i in rows]


@dataclass
class Sample:
    feeds: dict[str, np.ndarray]  # input name -> rows, as the graph takes them
    y: np.ndarray  # targets or class indices
    source: str


def _sample(task: t2d.Task, split: Any, pick: torch.Tensor, name: str, source: str) -> Sample:
    x, y = _checked(task, _rows(split, pick), name)
    return Sample(x.feeds(task), y.numpy(), source)


def training_samples(task: t2d.Task, ckpt: dict[str, Any], calibration_n: int, validation_n: int,
                     data_dir: str | None, seed: int = CALIBRATION_SEED) -> tuple[Sample | None, Sample | None]:
    """A calibration sample (the first `calibration_n` rows of a seeded shuffle of the training split) and a
    validation sample (the next `validation_n`, or when too few are left, the first rows of the same shuffle).

    Only `Splits.train` is touched: the test split is what the gate measures on, and calibrating or choosing
    layers on it would make the measurement flatter the quantized model."""
    train = _splits(task, ckpt, data_dir, "calibrate").train
    size = len(train[0]) if isinstance(train, (tuple, list)) and len(train) == 2 else len(train)
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    calibration = None if not calibration_n else _sample(
        task, train, perm[:calibration_n].sort().values, "train",
        f"{min(calibration_n, size)} of {size} samples of the training split, seed {seed}")
    if not validation_n:
        return calibration, None
    rest = perm[calibration_n:calibration_n + validation_n]
    if len(rest) >= MIN_VALIDATION:
        what = f"{len(rest)} further samples of the training split (none used to calibrate)"
    else:
        rest = perm[:validation_n]
        what = f"{len(rest)} samples of the training split (too few left: they include the calibration samples)"
    return calibration, _sample(task, train, rest.sort().values, "train", what)


def calibration_inputs(task: t2d.Task, ckpt: dict[str, Any], n: int, data_dir: str | None,
                       seed: int = CALIBRATION_SEED) -> tuple[np.ndarray, str]:
    """n raw inputs of the (first) input drawn (seeded, without replacement) from the task's training split, and a
    description."""
    sample, _ = training_samples(task, ckpt, n, 0, data_dir, seed)
    return sample.feeds[task.input.name], sample.source


def held_out_data(task: t2d.Task, ckpt: dict[str, Any], data_dir: str | None) -> Sample:
    """The task's whole test split."""
    x, y = _checked(task, _splits(task, ckpt, data_dir, "measure the quantized model").test, "test")
    return Sample(x.feeds(task), y.numpy(), f"the whole test split of task {task.name} ({len(x)} samples)")


# --- writing the quantized file -------------------------------------------------------------------------------


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over fixed arrays: batches of feeds, then None."""

    def __init__(self, feeds: dict[str, np.ndarray], batch: int = CALIBRATION_BATCH):
        n = len(next(iter(feeds.values())))
        self.feeds = [{k: v[i:i + batch] for k, v in feeds.items()} for i in range(0, n, batch)]
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


def prepare(float_file: Path, tmp: Path, calibration: dict[str, np.ndarray] | None) -> tuple[Path, int]:
    """The float graph as the quantizer takes it: BatchNorm folded through max-pooling where exact, then
    onnxruntime's `quant_pre_process`. Returns the prepared file and how many BatchNorms were folded."""
    from onnxruntime.quantization import quant_pre_process

    model = onnx.load(str(float_file))
    folded = fold_batchnorm_through_maxpool(model)
    if folded:
        folded_file = tmp / "folded.onnx"
        onnx.save(model, str(folded_file))
        if calibration is not None:  # the rewrite is exact in real arithmetic: check it in float32 before going on
            want, got = (predict(session(f), calibration, CALIBRATION_BATCH) for f in (float_file, folded_file))
            err = float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))
            if not err <= 1e-4:
                raise ExportError(f"folding BatchNorm into the convolutions changed the float outputs by {err:.2g}")
        float_file = folded_file
    prepared = tmp / "prepared.onnx"
    try:  # symbolic shape inference + onnxruntime graph optimizations
        # When symbolic inference gives up, onnxruntime saves its half-inferred graph (and weight files) to the
        # working directory: run it from the temporary folder so nothing is left in the user's.
        source, target = str(float_file.resolve()), str(prepared.resolve())  # before the chdir: paths may be relative
        with contextlib.chdir(tmp):
            quant_pre_process(source, target)
    except Exception as e:  # a Transformer's graph defeats symbolic shape inference: onnx's own inference then
        if "symbolic shape inference" not in str(e):
            raise
        quant_pre_process(str(float_file), str(prepared), skip_symbolic_shape=True)
    return prepared, folded


def write_int8(prepared: Path, path: Path, method: str, int8_format: str, calibration: dict[str, np.ndarray] | None,
               kept: list[keep_float.Layer] = (), cache: Path | None = None) -> dict:
    """Quantize the prepared graph to `path` in `int8_format`, leaving the `kept` layers in float32."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    exclude = keep_float.excluded_nodes(list(kept))
    vnni = int8_format == "vnni"
    if method == "static":
        # int8 activations and int8 weights per output channel (QDQ), 7 bits of weight unless for VNNI CPUs.
        quantize_static(str(prepared), str(path), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=not vnni, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        nodes_to_exclude=exclude, calibration_cache_path=cache)
        return {"method": "static", "format": "QDQ", "int8_format": int8_format, "requires_vnni": vnni,
                "activations": "int8, per tensor, calibrated (MinMax)",
                "weights": "int8 symmetric, per output channel" + ("" if vnni else ", 7-bit range (reduce_range)")}
    # Dynamic: onnxruntime quantizes activations per batch (uint8) and weights per output channel: per channel
    # halved the product MLP's added error against per tensor (BENCHMARKS.md).
    quantize_dynamic(str(prepared), str(path), weight_type=QuantType.QInt8 if vnni else QuantType.QUInt8,
                     per_channel=True, nodes_to_exclude=exclude)
    return {"method": "dynamic", "int8_format": int8_format, "requires_vnni": vnni,
            "activations": "uint8, per tensor, range computed per batch at run time",
            "weights": ("int8 symmetric" if vnni else "uint8") + ", per output channel"}


def write_fp16(float_file: Path) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        model = convert_float_to_float16(onnx.load(str(float_file)), keep_io_types=True)
    except Exception as e:  # onnxruntime's tools raise anything from AssertionError to RuntimeError
        raise ExportError(f"fp16 conversion failed: {first_line(e)[:300]}") from None
    _sort_nodes(model.graph)  # the converter appends its input Casts after the nodes that read them
    return model


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


# --- measuring ------------------------------------------------------------------------------------------------


def session(path: Path | bytes, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), opts,
                                providers=["CPUExecutionProvider"])


def predict(sess, feeds: dict[str, np.ndarray] | np.ndarray, batch: int, output: str | None = None) -> np.ndarray:
    """One output (default: the first) for all rows of `feeds`, run `batch` rows at a time."""
    if not isinstance(feeds, dict):
        feeds = {sess.get_inputs()[0].name: feeds}
    n = len(next(iter(feeds.values())))
    names = [output] if output else [sess.get_outputs()[0].name]
    return np.concatenate([sess.run(names, {k: v[i:i + batch] for k, v in feeds.items()})[0]
                           for i in range(0, n, batch)])


def check_io(sess, contract: dict[str, Any], variant: str) -> None:
    """What the server relies on: the contract's input and output names and element types."""
    def entries(key: str) -> list[tuple[str, str]]:
        return [(e["name"], ORT_TYPES[e["dtype"]]) for e in contract[key]]

    got = [(i.name, i.type) for i in sess.get_inputs()], [(o.name, o.type) for o in sess.get_outputs()]
    want = entries("inputs"), entries("outputs")
    if got != want:
        raise ExportError(f"the {variant} model's inputs and outputs are {got}, the contract says {want}")


def measure(kind: str, y: np.ndarray, ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """The float model's outputs `ref` and the quantized model's `got` on the same inputs, against the truth `y`."""
    if kind == "classification":
        return {"float_accuracy": 100 * float((ref.argmax(1) == y).mean()),
                "quantized_accuracy": 100 * float((got.argmax(1) == y).mean()),
                "agreement": selfcheck.agreement(kind, ref, got)}
    ref, got, y = (a.astype(np.float64) for a in (ref, got, y))
    rel = np.abs(got - ref) / np.maximum(np.abs(ref), 1e-12)
    return {"float_mre": 100 * float((np.abs(ref - y) / np.abs(y)).mean()),
            "quantized_mre": 100 * float((np.abs(got - y) / np.abs(y)).mean()),
            "agreement": selfcheck.agreement(kind, ref, got), "max_rel_diff": float(rel.max())}


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


def loss_of(kind: str, g: dict[str, Any]) -> float:
    """What the gate bounds: accuracy points lost, or % added to the mean relative error."""
    return g["accuracy_drop"] if kind == "classification" else g["error_increase"]


def evaluate(kind: str, method: str, reference: np.ndarray, q_sess, data: Sample, output: str,
             q: QuantizeOptions) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The gate's verdict on `data` and the measurement at each batch size. A static or fp16 graph computes each
    row alone; a dynamic one scales activations per batch, so a row's answer depends on its batch: measured
    alone and in a full batch, and gated on the worse."""
    batches = [1, EVAL_BATCH] if method == "dynamic" else [EVAL_BATCH]
    results = [{**measure(kind, data.y, reference, predict(q_sess, data.feeds, b, output)), "batch": b}
               for b in batches]
    return gate(kind, worst(kind, results), q), results


def latency(float_sess, q_sess, feeds: dict[str, np.ndarray], batch: int) -> dict[str, Any]:
    """Median seconds per call of each model on `batch` rows, the two alternating in rounds so that load from
    other processes falls on both alike; single-threaded sessions, as the server runs them."""
    x = {k: v[:batch] for k, v in feeds.items()}
    times: dict[str, list[float]] = {"float32": [], "quantized": []}
    sessions = {"float32": float_sess, "quantized": q_sess}
    for s in sessions.values():
        s.run(None, x)  # warm-up: first-call allocations
    deadline = time.perf_counter() + 2 * LATENCY_SECONDS
    while time.perf_counter() < deadline or min(len(t) for t in times.values()) < 3:
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(None, x)
            times[name].append(time.perf_counter() - t0)
    f, qt = (statistics.median(times[k]) for k in ("float32", "quantized"))
    return {"batch": len(next(iter(x.values()))), "float32_ms": 1e3 * f, "quantized_ms": 1e3 * qt, "ratio": qt / f,
            "calls": len(times["float32"])}


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
    kept = report.get("kept_float") or []
    also = f" with {len(kept)} layer(s) kept float32" if kept else ""
    return (f"{variant} model refused: {numbers} at batch {g['batch']} on {report['eval_data']['samples']} "
            f"test samples{also}")


# --- the whole step -------------------------------------------------------------------------------------------


def quantize(task: t2d.Task, ckpt: dict[str, Any], contract: dict[str, Any], float_file: Path, out: Path,
             q: QuantizeOptions, data_dir: str | None) -> dict[str, Any]:
    """Write the variant, measure it against the float32 file, write quantization.json; returns the report
    (report["passed"] says whether the gate held; report["file"] is the variant's file)."""
    contract = {**contract, "variant": q.variant}
    output = scored_output(contract)
    t0 = time.perf_counter()
    if q.variant == "int8":
        model, details = _int8(task, ckpt, float_file, out, q, data_dir, output)
    else:
        model, details = write_fp16(float_file), {"method": "fp16", "weights": "float16",
                                                  "io": "float32 (Cast nodes at the graph's edges)"}
    path = out / variant_file(q.variant)
    props = {p.key: p.value for p in onnx.load(str(float_file), load_external_data=False).metadata_props}
    props |= {"contract": json.dumps(contract), "variant": q.variant}
    del model.metadata_props[:]  # the float model's, with this variant's contract instead
    save_onnx(model, path, props, full_check=False)
    seconds = time.perf_counter() - t0
    test = held_out_data(task, ckpt, data_dir)  # after calibration and selection, which read only the training split
    ref_sess, q_sess = session(float_file), session(path)
    check_io(q_sess, contract, q.variant)
    reference = predict(ref_sess, test.feeds, EVAL_BATCH, output)
    g, results = evaluate(task.kind, details["method"], reference, q_sess, test, output, q)
    cpu = cpu_info()
    report = {
        "variant": q.variant, "passed": g["passed"], "file": str(path), "contract_variant": q.variant,
        **details,
        "eval_data": {"source": test.source, "samples": len(test.y), "batches": [r["batch"] for r in results]},
        "gate": g, "by_batch": results,
        "size_bytes": {"float32": float_file.stat().st_size, q.variant: path.stat().st_size,
                       "ratio": path.stat().st_size / float_file.stat().st_size},
        "quantize_seconds": round(seconds, 2),
        "cpu": cpu,
    }
    if g["passed"]:
        one, single = session(float_file, threads=1), session(path, threads=1)
        report["latency"] = [latency(one, single, test.feeds, b) for b in (1, min(EVAL_BATCH, len(test.y)))]
        report["self_check"] = _write_self_check(task.kind, test, reference, q_sess, output, out,
                                                 details.get("requires_vnni", False))
    write_json(out / QUANT_FILE, report)
    return report


def scored_output(contract: dict[str, Any]) -> str:
    """The output the task's loss and metrics read (the first, unless the contract names another)."""
    return contract.get("scored_output") or contract["outputs"][0]["name"]


def _int8(task: t2d.Task, ckpt: dict[str, Any], float_file: Path, out: Path, q: QuantizeOptions,
          data_dir: str | None, output: str) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The int8 graph and what went into it: format, calibration, the layers kept float and why."""
    method = int8_method(task, q.method)
    calibration, validation = training_samples(task, ckpt, q.calibration_samples if method == "static" else 0,
                                               VALIDATION_SAMPLES if q.fallback else 0, data_dir)
    calib = calibration.feeds if calibration is not None else None
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tmp = Path(tmp)
        try:
            prepared, folded = prepare(float_file, tmp, calib)
            candidates = keep_float.layers(onnx.load(str(prepared)))
        except ExportError:
            raise
        except Exception as e:  # onnxruntime's tools raise anything from AssertionError to RuntimeError
            raise ExportError(f"int8 quantization failed: {first_line(e)[:300]}") from None
        pinned = keep_float.resolve(candidates, q.keep_float)
        cache = tmp / "calibration.json"  # ranges measured once, reused by every trial of the selection
        selection = None
        if validation is not None:
            reference = predict(session(float_file), validation.feeds, EVAL_BATCH, output)

            def attempt(kept: list[keep_float.Layer]) -> keep_float.Trial:
                trial_file = tmp / "trial.onnx"
                details = _quantized(prepared, trial_file, method, q.int8_format, calib, kept, cache)
                g, _ = evaluate(task.kind, details["method"], reference, session(trial_file), validation, output, q)
                return keep_float.Trial(list(kept), loss_of(task.kind, g), g["passed"], g)

            kept, trials = keep_float.select(candidates, pinned, attempt)
            selection = {"validation": {"split": "train", "source": validation.source, "samples": len(validation.y)},
                         "trials": [t.to_dict() for t in trials]}
        else:
            kept = pinned
        raw = tmp / "q.onnx"
        details = _quantized(prepared, raw, method, q.int8_format, calib, kept, cache)
        model = onnx.load(str(raw), load_external_data=False)
    pinned_labels = {layer.label for layer in pinned}
    details |= {
        "preprocess": "quant_pre_process", "batchnorm_folded_through_maxpool": folded,
        "calibration": None if calib is None else {"split": "train", "source": calibration.source,
                                                   "samples": len(calibration.y), "seed": CALIBRATION_SEED},
        "layers": [layer.to_dict() for layer in candidates],
        "kept_float": [{**layer.to_dict(), "why": "--keep-float" if layer.label in pinned_labels else
                        "selected on validation: the variant missed the bound with it in int8"} for layer in kept],
        "selection": selection,
    }
    return model, details


def _quantized(prepared: Path, path: Path, method: str, int8_format: str, calibration, kept, cache) -> dict:
    try:
        return write_int8(prepared, path, method, int8_format, calibration, kept, cache)
    except Exception as e:  # onnxruntime's tools raise anything from AssertionError to RuntimeError
        raise ExportError(f"int8 quantization failed: {first_line(e)[:300]}") from None


def _write_self_check(kind: str, test: Sample, reference: np.ndarray, q_sess, output: str, out: Path,
                      requires_vnni: bool) -> dict[str, Any]:
    """selfcheck.npz: the first rows of the test split, the float answers, and the variant's agreement here."""
    n = selfcheck.sample_rows(test.feeds)
    feeds = {k: v[:n] for k, v in test.feeds.items()}
    got = q_sess.run([output], feeds)[0]  # one batch, as the server runs it
    data, meta = selfcheck.build(kind, feeds, output, reference[:n], got, requires_vnni)
    atomic_write(out / selfcheck.FILE, data)
    return {"file": selfcheck.FILE, **meta}


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the store entry's metadata carries (the full report is quantization.json in the entry)."""
    keys = ("variant", "method", "int8_format", "requires_vnni", "activations", "weights", "calibration", "eval_data",
            "gate", "size_bytes", "kept_float", "cpu", "latency", "self_check")
    return {k: report[k] for k in keys if k in report}
