"""The I/O contract of an exported model: raw units in, raw units out, as its task declares them.

    product:      x [batch, 2] float32, raw X1, X2              -> y [batch, 1] float32, X1*X2
    image tasks:  image [batch, 1, 28, 28] float32 in [0, 1]    -> logits [batch, 10] float32
    a user's task: its Input and Output, whatever their names and shapes

The contract is written once, here, into contract.json and the ONNX file's metadata; the server
reads it (and checks it against the graph's own inputs and outputs) and never imports a task.
"""

from typing import Any

import torch

from models import Predictor

CONTRACT_VERSION = 2


class ContractError(Exception):
    """The network does not compute what its task declares; the message is one line."""


def contract_of(task, predictor: Predictor) -> dict[str, Any]:
    """The contract of `task`'s (a t2d.Task) trained `predictor`, as plain JSON-able values."""
    inp, out = task.input, task.output
    with torch.no_grad():
        got = tuple(predictor.eval()(torch.zeros(2, *inp.shape)).shape)
    if got != (2, out.size):
        raise ContractError(f"task {task.name}'s network maps a batch of 2 inputs to shape {list(got)}, "
                            f"its Output {out.name} says {[2, out.size]}")
    norm = {"input": predictor.input_norm.to_dict()}
    if predictor.target_norm is not None:
        norm["target"] = predictor.target_norm.to_dict()
    return {
        "contract_version": CONTRACT_VERSION,
        "task": task.name,
        "kind": task.kind,
        "inputs": [{"name": inp.name, "dtype": inp.dtype, "shape": ["batch", *inp.shape],
                    "range": list(inp.range) if inp.range else None, "description": inp.description}],
        "outputs": [{"name": out.name, "dtype": "float32", "shape": ["batch", out.size],
                     "description": out.description}],
        "classes": list(task.classes) if task.classes else None,
        # [low, high) per feature of the training data: answers outside it are flagged as extrapolated.
        "train_range": [list(r) for r in inp.train_range] if inp.train_range else None,
        "normalization": norm,  # inside the graph already; for people reading the contract
        "variant": "fp32",
    }
