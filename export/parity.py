"""Prove the artifacts compute the eager model's function: names, then shapes, then values.

Every format runs on the same held-out raw inputs at each batch size (1, an odd size, and a
large one by default, to exercise the dynamic batch axis); the eager module is the reference.
Values must satisfy `|got - eager| <= atol + rtol * |eager|` everywhere, and a classifier's
argmax must agree on every row.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from models.checkpoint import first_line

INPUT_SEED = 20261123  # random parity inputs are fresh: neither the training seeds nor the product test seed 123


class ParityError(Exception):
    """An artifact disagrees with the eager model; the message names the format, error and input."""


@dataclass
class Inputs:
    x: torch.Tensor  # (N, ...) raw units, as the contract takes them
    source: str  # where they came from, for parity.json


def held_out_inputs(task, ckpt: dict[str, Any], n: int, data_dir: str | None) -> Inputs:
    """n raw inputs the model was not trained on: the task's own `parity_inputs`, else the first n of its
    test split (repeated if it has fewer), read as training read it; where the data cannot be had here,
    random inputs over the input's range (or its training statistics), and the source says so."""
    import t2d

    g = torch.Generator().manual_seed(INPUT_SEED)
    if task.parity_inputs is not None:
        return Inputs(task.parity_inputs(n, g).float(), f"{n} inputs from task {task.name}'s parity_inputs, "
                                                       f"seed {INPUT_SEED}")
    try:
        opts = t2d.DataOptions.from_config(ckpt.get("config") or {}, dir=data_dir, download=False)
        x = task.data(opts).test
        x = x[0] if isinstance(x, (tuple, list)) else torch.stack([torch.as_tensor(x[i][0]) for i in range(min(n, len(x)))])
        x = torch.as_tensor(x).float()
        if tuple(x.shape[1:]) != task.input.shape or not len(x):
            raise ValueError(f"test inputs of shape {list(x.shape)}")
        source = f"first {min(n, len(x))} test inputs of task {task.name}" + (f", repeated to {n}" if len(x) < n else "")
        return Inputs(x[torch.arange(n) % len(x)], source)
    except Exception as e:  # no data here (another machine, no folder): still check parity, and say on what
        reason = first_line(e)[:200]
    shape = (n, *task.input.shape)
    if task.input.range is not None:
        low, high = task.input.range
        x = low + (high - low) * torch.rand(shape, generator=g)
        what = f"uniform in [{low:g}, {high:g}]"
    else:
        norm = (ckpt.get("normalization") or {}).get("input") or {}
        mean = torch.tensor(norm.get("mean", [0.0])).reshape(task.input.stats_shape)
        std = torch.tensor(norm.get("std", [1.0])).reshape(task.input.stats_shape)
        x = mean + std * torch.randn(shape, generator=g)
        what = "normal with the training mean and std"
    return Inputs(x, f"{n} random inputs, {what}, seed {INPUT_SEED} (test data unavailable: {reason})")


def runners(module: nn.Module, contract: dict[str, Any], files: dict[str, Path]) -> dict[str, Callable]:
    """format -> function from an input batch (numpy) to (output names, outputs)."""
    out_name = contract["outputs"][0]["name"]
    run = {"eager": lambda x: ([out_name], _eager(module, x))}
    if "torchscript" in files:
        ts = torch.jit.load(str(files["torchscript"]))  # the saved file, not the in-memory trace
        run["torchscript"] = lambda x: ([out_name], _eager(ts, x))
    if "onnx" in files:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(files["onnx"]), opts, providers=["CPUExecutionProvider"])
        inputs = [i.name for i in session.get_inputs()]
        if inputs != [contract["inputs"][0]["name"]]:
            raise ParityError(f"parity failed for onnx: inputs are named {inputs}, the contract says "
                              f"{[contract['inputs'][0]['name']]}")
        names = [o.name for o in session.get_outputs()]
        run["onnx"] = lambda x: (names, session.run(None, {inputs[0]: x})[0])
    return run


def check(module: nn.Module, contract: dict[str, Any], files: dict[str, Path], inputs: Inputs,
          batch_sizes: list[int], atol: float, rtol: float) -> dict[str, Any]:
    """The parity report: every comparison, the worst per format, and whether all passed."""
    run = runners(module, contract, files)
    expected_names = [contract["outputs"][0]["name"]]
    report: dict[str, Any] = {"passed": False, "atol": atol, "rtol": rtol, "inputs": inputs.source,
                              "batch_sizes": batch_sizes, "checks": []}
    for batch in batch_sizes:
        x = inputs.x[:batch].numpy()
        _, want = run["eager"](x)
        for fmt in (f for f in run if f != "eager"):
            names, got = run[fmt](x)
            result = compare(fmt, batch, expected_names, names, want, np.asarray(got), atol, rtol,
                             contract["kind"] == "classification")
            report["checks"].append(result)
    report["worst"] = {fmt: max((c for c in report["checks"] if c["format"] == fmt), key=lambda c: c["max_abs_err"])
                       for fmt in run if fmt != "eager"}
    report["passed"] = all(c["passed"] for c in report["checks"])
    return report


def compare(fmt: str, batch: int, expected_names: list[str], names: list[str], want: np.ndarray, got: np.ndarray,
            atol: float, rtol: float, classification: bool) -> dict[str, Any]:
    """One format at one batch size: names, then shape, then values."""
    result = {"format": fmt, "batch": batch, "output_names": names, "shape": list(got.shape),
              "max_abs_err": float("inf"), "max_rel_err": float("inf"), "worst_index": None, "passed": False}
    if names != expected_names:
        result["reason"] = f"output names {names}, expected {expected_names}"
        return result
    if got.shape != want.shape:
        result["reason"] = f"output shape {list(got.shape)}, expected {list(want.shape)}"
        return result
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    diff = np.where(np.isfinite(got), diff, np.inf)  # a NaN output is an infinite error, not a silent pass
    tol = atol + rtol * np.abs(want.astype(np.float64))
    worst = np.unravel_index(int(np.argmax(diff - tol)), diff.shape)  # the furthest outside its tolerance
    result.update(max_abs_err=float(diff.max()), max_rel_err=float((diff / np.maximum(np.abs(want), 1e-12)).max()),
                  worst_index=int(worst[0]), passed=bool((diff <= tol).all()))
    if classification:
        agree = float((got.argmax(1) == want.argmax(1)).mean())
        result["argmax_agreement"] = agree
        result["passed"] = result["passed"] and agree == 1.0
    if not result["passed"]:
        result["reason"] = (f"max abs error {result['max_abs_err']:.3g} (max rel {result['max_rel_err']:.3g}) "
                            f"at input {result['worst_index']}, tolerance atol {atol:g} rtol {rtol:g}"
                            + (f", argmax agrees on {result['argmax_agreement']:.2%}" if classification else ""))
    return result


def failure_message(report: dict[str, Any]) -> str:
    """One line for the first failed comparison."""
    f = next(c for c in report["checks"] if not c["passed"])
    return f"parity failed for {f['format']} at batch {f['batch']}: {f['reason']}"


def _eager(module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return module(torch.from_numpy(x)).numpy()
