"""Prove the artifacts compute the eager model's function: names, then shapes, then values.

Every format runs on the same held-out raw inputs at each batch size (1, an odd size, and a
large one sized to the model's speed by default, to exercise the dynamic batch axis) and, where a size
varies, at several sizes (1, a middle one, the longest held-out sample and the declared maximum); the eager module is
the reference. Every output must satisfy `|got - eager| <= atol + rtol * |eager|` everywhere, and a
classifier's argmax must agree on every row. A tokenized input's held-out strings must map to the
same ids through the contract's tokenizer (what the server runs) as through the task's (what training ran).
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from models.checkpoint import first_line
from t2d.splits import Features, padding_mask, split_tensors
from t2d.text import Tokenizer

LARGE_BATCH = 1024  # the largest parity batch; fewer rows for a model that is slow
LARGE_BATCH_SECONDS = 2.0  # the eager model's time for the large batch, at most (each format runs it too)
INPUT_SEED = 20261123  # random parity inputs are fresh: neither the training seeds nor the product test seed 123


class ParityError(Exception):
    """An artifact disagrees with the eager model; the message names the format, error and input."""


@dataclass
class Inputs:
    x: Features  # N samples of every input, raw units, as the contract takes them
    source: str  # where they came from, for parity.json
    texts: dict[str, list[str]] = field(default_factory=dict)  # a tokenized input's held-out strings


def held_out_inputs(task, ckpt: dict[str, Any], n: int, data_dir: str | None) -> Inputs:
    """n raw inputs the model was not trained on: the task's own `parity_inputs`, else the first n of its
    test split (repeated if it has fewer), read as training read it; where the data cannot be had here,
    random inputs over each input's range (or its training statistics), and the source says so."""
    import t2d

    g = torch.Generator().manual_seed(INPUT_SEED)
    if task.parity_inputs is not None:
        x, _ = split_tensors(task, (task.parity_inputs(n, g), torch.zeros(n, dtype=torch.long)
                                    if not task.regression else torch.zeros(n, task.output.size)), "parity")
        return Inputs(x, f"{n} inputs from task {task.name}'s parity_inputs, seed {INPUT_SEED}")
    try:
        opts = t2d.DataOptions.from_config(ckpt.get("config") or {}, dir=data_dir, download=False)
        test = task.data(opts).test
        if not isinstance(test, (tuple, list)):  # a Dataset: read only the first n samples
            test = torch.utils.data.Subset(test, range(min(n, len(test))))
        x, _ = split_tensors(task, test, "test")
        texts = _texts(task, test, n)
        source = (f"first {min(n, len(x))} test inputs of task {task.name}"
                  + (f", repeated to {n}" if len(x) < n else ""))
        return Inputs(x.select(torch.arange(n) % len(x)), source, texts)
    except Exception as e:  # no data here (another machine, no folder): still check parity, and say on what
        reason = first_line(e)[:200]
    x, how = random_inputs(task, ckpt, n, g)
    what = next(iter(how.values())) if len(how) == 1 else "; ".join(f"{k} {v}" for k, v in how.items())
    return Inputs(x, f"{n} random inputs, {what}, seed {INPUT_SEED} (test data unavailable: {reason})")


def _texts(task, split, n: int) -> dict[str, list[str]]:
    """The held-out strings of each tokenized input, as the data give them."""
    tokenized = [i.name for i in task.data_inputs if i.tokenizer is not None]
    if not tokenized:
        return {}
    if isinstance(split, (tuple, list)):
        x = split[0]
        rows = [{k: x[k][j] for k in x} if isinstance(x, dict) else x[j] for j in range(min(n, len(split[1])))]
    else:
        rows = [split[j][0] for j in range(min(n, len(split)))]
    single = len(task.data_inputs) == 1
    return {name: [str(r if single else r[name]) for r in rows] for name in tokenized}


def random_inputs(task, ckpt: dict[str, Any], n: int, g: torch.Generator) -> tuple[Features, dict[str, str]]:
    """n random raw inputs: floats uniform over their range or normal with the training statistics, ids uniform
    over their range, sizes uniform up to each input's max_length, padding masks made from those sizes; and how
    each input was drawn."""
    sd = ckpt.get("state_dict") or {}
    lengths = {name: torch.randint(1, i.max_length + 1, (n,), generator=g)
               for i in task.inputs for name in i.dims}
    tensors, how = [], {}
    for k, inp in enumerate(task.inputs):
        shape = (n, *(inp.max_length if s is None else s for s in inp.shape))
        if inp.padding_mask_of:
            tensors.append(padding_mask(shape, inp, lengths))
            continue
        if inp.dtype == "int64":
            low, high = (int(inp.range[0]), int(inp.range[1])) if inp.range else (0, 0)
            x, how[inp.name] = torch.randint(low, high + 1, shape, generator=g), f"integers uniform in [{low}, {high}]"
        elif inp.dtype == "bool":
            x, how[inp.name] = torch.rand(shape, generator=g) < 0.5, "booleans"
        elif inp.range is not None:
            low, high = inp.range
            x, how[inp.name] = low + (high - low) * torch.rand(shape, generator=g), f"uniform in [{low:g}, {high:g}]"
        else:
            mean = sd.get(f"input_norms.{k}.mean", torch.zeros(1)).reshape(inp.stats_shape)
            std = sd.get(f"input_norms.{k}.std", torch.ones(1)).reshape(inp.stats_shape)
            x, how[inp.name] = mean + std * torch.randn(shape, generator=g), "normal with the training mean and std"
        if inp.variable:  # past each sample's size: the input's padding value
            x = torch.where(padding_mask(shape, inp, lengths), torch.tensor(inp.pad, dtype=x.dtype), x)
        tensors.append(x)
    return Features(tuple(tensors), tuple(i.axis_dims for i in task.inputs), lengths), how


def at_size(task, x: Features, size: int) -> Features:
    """`x` with every variable size set to `size`: longer samples cut short, shorter ones padded, masks made anew."""
    lengths = {name: n.clamp(max=size) for name, n in x.lengths.items()}
    tensors = []
    for inp, t in zip(task.inputs, x.tensors):
        shape = (len(t), *(size if s is None else s for s in inp.shape))
        if inp.padding_mask_of:
            tensors.append(padding_mask(shape, inp, lengths))
            continue
        out = torch.full(shape, inp.pad, dtype=t.dtype)
        region = tuple(slice(0, min(a, b)) for a, b in zip(shape, t.shape))
        out[region] = t[region]
        if inp.variable:  # past the clipped sizes: padding, as the model is told by its mask
            out = torch.where(padding_mask(shape, inp, lengths), torch.tensor(inp.pad, dtype=t.dtype), out)
        tensors.append(out)
    return Features(tuple(tensors), x.axes, lengths)


def sizes(task, x: Features) -> list[int | None]:
    """The variable sizes to check at: 1, a middle one, the longest held-out sample, the declared maximum."""
    if not x.lengths:
        return [None]
    longest = int(max(n.max() for n in x.lengths.values()))
    most = max(i.max_length for i in task.inputs if i.variable)
    return sorted({1, (1 + longest) // 2, longest, most})


def large_batch(module: nn.Module, task) -> dict[str, Any]:
    """The large parity batch: LARGE_BATCH rows, or as many as the eager model runs in LARGE_BATCH_SECONDS (timed on
    a batch of 7 after a warm-up), at least 8: ResNet-18 at 224x224 takes tens of ms a row on a CPU, and 1024 rows
    would be minutes per format and size for no more evidence than a few dozen."""
    import time

    from export.contract import example_inputs

    xs = example_inputs(task, batch=7)
    with torch.inference_mode():
        module.eval()(*xs)
        t0 = time.perf_counter()
        module(*xs)
        per_row = (time.perf_counter() - t0) / 7
    rows = int(min(LARGE_BATCH, max(8, LARGE_BATCH_SECONDS / max(per_row, 1e-9))))
    return {"rows": rows, "eager_seconds_per_row": per_row, "budget_seconds": LARGE_BATCH_SECONDS,
            "why": "the default" if rows == LARGE_BATCH else
            f"{LARGE_BATCH} rows would take the eager model about {LARGE_BATCH * per_row:.0f} s"}


def runners(module: nn.Module, contract: dict[str, Any], files: dict[str, Path]) -> dict[str, Callable]:
    """format -> function from input batches (numpy, in the contract's order) to (output names, outputs)."""
    in_names = [i["name"] for i in contract["inputs"]]
    out_names = [o["name"] for o in contract["outputs"]]
    run = {"eager": lambda xs: (out_names, _eager(module, xs))}
    if "torchscript" in files:
        ts = torch.jit.load(str(files["torchscript"]))  # the saved file, not the in-memory trace
        run["torchscript"] = lambda xs: (out_names, _eager(ts, xs))
    if "onnx" in files:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(files["onnx"]), opts, providers=["CPUExecutionProvider"])
        inputs = [i.name for i in session.get_inputs()]
        if inputs != in_names:
            raise ParityError(f"parity failed for onnx: inputs are named {inputs}, the contract says {in_names}")
        names = [o.name for o in session.get_outputs()]
        run["onnx"] = lambda xs: (names, session.run(None, dict(zip(inputs, xs))))
    return run


def check(module: nn.Module, contract: dict[str, Any], files: dict[str, Path], inputs: Inputs,
          batch_sizes: list[int], atol: float, rtol: float, task=None) -> dict[str, Any]:
    """The parity report: every comparison, the worst per format, and whether all passed."""
    run = runners(module, contract, files)
    expected_names = [o["name"] for o in contract["outputs"]]
    target = contract.get("target") or expected_names[0]
    lengths = sizes(task, inputs.x) if task is not None else [None]
    report: dict[str, Any] = {"passed": False, "atol": atol, "rtol": rtol, "inputs": inputs.source,
                              "batch_sizes": batch_sizes, "checks": []}
    if lengths != [None]:
        report["sizes"] = lengths
    for size in lengths:
        x = inputs.x if size is None else at_size(task, inputs.x, size)
        for batch in batch_sizes:
            xs = [t[:batch].numpy() for t in x.tensors]
            _, want = run["eager"](xs)
            for fmt in (f for f in run if f != "eager"):
                names, got = run[fmt](xs)
                result = compare(fmt, batch, expected_names, names, want, [np.asarray(g) for g in got], atol, rtol,
                                 target if contract["kind"] == "classification" else None)
                if size is not None:
                    result["size"] = size
                report["checks"].append(result)
    report["worst"] = {fmt: max((c for c in report["checks"] if c["format"] == fmt), key=lambda c: c["max_abs_err"])
                       for fmt in run if fmt != "eager"}
    report["tokenizers"] = tokenizer_parity(task, contract, inputs.texts) if task is not None else {}
    report["passed"] = all(c["passed"] for c in report["checks"]) and all(
        t["passed"] for t in report["tokenizers"].values())
    return report


def tokenizer_parity(task, contract: dict[str, Any], texts: dict[str, list[str]]) -> dict[str, Any]:
    """For each tokenized input: do its held-out strings map to the same ids through the contract's tokenizer (the
    server's) as through the task's (training's)?"""
    out = {}
    for entry in contract["inputs"]:
        if "tokenizer" not in entry:
            continue
        inp = next(i for i in task.inputs if i.name == entry["name"])
        served = Tokenizer.from_dict(entry["tokenizer"])
        strings = texts.get(inp.name, [])
        bad = next((s for s in strings if _encode(inp.tokenizer, s, inp.max_length)
                    != _encode(served, s, entry["max_length"])), None)
        out[inp.name] = {"strings": len(strings), "passed": bad is None,
                         **({"first_difference": bad} if bad is not None else {})}
    return out


def _encode(tokenizer: Tokenizer, text: str, max_length: int):
    try:
        return tokenizer.encode(text, max_length)
    except ValueError as e:
        return str(e)


def compare(fmt: str, batch: int, expected_names: list[str], names: list[str], want: list[np.ndarray],
            got: list[np.ndarray], atol: float, rtol: float, classes_of: str | None) -> dict[str, Any]:
    """One format at one batch size: names, then every output's shape, then values (`classes_of`: the output
    whose argmax must agree too)."""
    result = {"format": fmt, "batch": batch, "output_names": names, "shape": [list(g.shape) for g in got],
              "max_abs_err": float("inf"), "max_rel_err": float("inf"), "worst_index": None, "worst_output": None,
              "passed": False}
    if names != expected_names:
        result["reason"] = f"output names {names}, expected {expected_names}"
        return result
    for name, w, g in zip(names, want, got):
        if g.shape != w.shape:
            result["reason"] = f"output {name} has shape {list(g.shape)}, expected {list(w.shape)}"
            return result
    passed, worst_over, worst = True, -np.inf, (None, None)
    abs_err = rel_err = 0.0
    for name, w, g in zip(names, want, got):
        w64, g64 = w.astype(np.float64), g.astype(np.float64)
        diff = np.where(np.isfinite(g64), np.abs(g64 - w64), np.inf)  # a NaN output is an infinite error
        over = diff - (atol + rtol * np.abs(w64))
        passed &= bool((over <= 0).all())
        if diff.size:
            abs_err = max(abs_err, float(diff.max()))
            rel_err = max(rel_err, float((diff / np.maximum(np.abs(w64), 1e-12)).max()))
            i = np.unravel_index(int(np.argmax(over)), diff.shape)
            if over[i] > worst_over:  # the furthest outside its tolerance, over every output
                worst_over, worst = over[i], (int(i[0]), name)
    result.update(max_abs_err=abs_err, max_rel_err=rel_err, worst_index=worst[0], worst_output=worst[1],
                  passed=passed)
    if classes_of is not None:
        k = names.index(classes_of)
        agree = float((got[k].argmax(1) == want[k].argmax(1)).mean())
        result["argmax_agreement"] = agree
        result["passed"] = result["passed"] and agree == 1.0
    if not result["passed"]:
        result["reason"] = (f"max abs error {result['max_abs_err']:.3g} (max rel {result['max_rel_err']:.3g}) "
                            f"in output {worst[1]} at input {worst[0]}, tolerance atol {atol:g} rtol {rtol:g}"
                            + (f", argmax agrees on {result['argmax_agreement']:.2%}" if classes_of else ""))
    return result


def failure_message(report: dict[str, Any]) -> str:
    """One line for the first failed comparison (or tokenizer)."""
    f = next((c for c in report["checks"] if not c["passed"]), None)
    if f is None:
        name, t = next((k, v) for k, v in report["tokenizers"].items() if not v["passed"])
        return (f"parity failed for input {name}'s tokenizer: the contract's maps {t['first_difference']!r} to other "
                f"ids than the task's")
    at = f" and size {f['size']}" if "size" in f else ""
    return f"parity failed for {f['format']} at batch {f['batch']}{at}: {f['reason']}"


def _eager(module, xs: list[np.ndarray]) -> list[np.ndarray]:
    with torch.inference_mode():
        out = module(*(torch.from_numpy(x) for x in xs))
    return [o.numpy() for o in ((out,) if isinstance(out, torch.Tensor) else out)]
