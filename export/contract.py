"""The I/O contract of an exported model: raw units in, raw units out, as its task declares them.

    product:      x [batch, 2] float32, raw X1, X2              -> y [batch, 1] float32, X1*X2
    image tasks:  image [batch, 1, 28, 28] float32 in [0, 1]    -> logits [batch, 10] float32
    a user's task: its Inputs and Outputs, whatever their names, dtypes and shapes, e.g.
                  ids [batch, length] int64 in [0, 99], mask [batch, length] bool -> logits [batch, 7], ...

A variable size is named in the shape ("length"); its input says the largest it may be (max_length) and
the value that pads it. A padding mask says which input it is made from, and a tokenized input carries
its tokenizer (vocabulary and all), so the server can take text. The contract is written once, here,
into contract.json and the ONNX file's metadata; the server reads it (and checks it against the graph's
own inputs and outputs) and never imports a task.
"""

from typing import Any

import torch

from models import Predictor

# 3: dtypes int64 and bool, several inputs and outputs, named variable sizes, padding, tokenizers, "target".
CONTRACT_VERSION = 3


class ContractError(Exception):
    """The network does not compute what its task declares; the message is one line."""


def example_inputs(task, batch: int = 3, length: int = 3) -> tuple[torch.Tensor, ...]:
    """Valid raw inputs of every kind, for tracing and checking: `batch` rows (not 1, and variable sizes not 1,
    which an exporter may take for constants), values inside each input's range, no padding."""
    g = torch.Generator().manual_seed(0)
    xs = []
    for inp in task.inputs:
        shape = (batch, *(min(length, inp.max_length) if s is None else s for s in inp.shape))
        if inp.dtype == "bool":
            xs.append(torch.zeros(shape, dtype=torch.bool))
        elif inp.dtype == "int64":
            low, high = (int(inp.range[0]), int(inp.range[1])) if inp.range else (0, 0)
            xs.append(torch.randint(low, high + 1, shape, generator=g))
        else:
            low, high = inp.range if inp.range else (0.0, 1.0)
            xs.append(low + (high - low) * torch.rand(shape, generator=g))
    return tuple(xs)


def contract_of(task, predictor: Predictor) -> dict[str, Any]:
    """The contract of `task`'s (a t2d.Task) trained `predictor`, as plain JSON-able values."""
    xs = example_inputs(task, batch=2)
    with torch.no_grad():
        out = predictor.eval()(*xs)
    outs = (out,) if isinstance(out, torch.Tensor) else tuple(out)
    sizes = {name: x.shape[axis] for i, x in zip(task.inputs, xs) for axis, name in i.axis_dims.items()}
    for o, got in zip(task.outputs, outs):
        names = iter(o.dims)
        want = (2, *(sizes.get(next(names)) if s is None else s for s in o.shape))
        if len(outs) != len(task.outputs) or tuple(got.shape) != want:
            raise ContractError(f"task {task.name}'s network maps a batch of 2 inputs to shape {list(got.shape)} for "
                                f"output {o.name}, its Output says {list(want)}")
    first = task.inputs[0]
    return {
        "contract_version": CONTRACT_VERSION,
        "task": task.name,
        "kind": task.kind,
        "inputs": [_input(i) for i in task.inputs],
        "outputs": [{"name": o.name, "dtype": "float32", "shape": ["batch", *_named(o.shape, o.dims)],
                     "description": o.description} for o in task.outputs],
        "target": task.output.name,  # the output the classes (or the regression targets) describe
        "classes": list(task.classes) if task.classes else None,
        # [low, high) per feature of the training data: answers outside it are flagged as extrapolated.
        "train_range": [list(r) for r in first.train_range] if first.train_range else None,
        "normalization": predictor.norm_stats(task),  # inside the graph already; for people reading the contract
        "variant": "fp32",
    }


def _named(shape, dims) -> list:
    names = iter(dims)
    return [next(names) if s is None else s for s in shape]


def _input(i) -> dict[str, Any]:
    entry = {"name": i.name, "dtype": i.dtype, "shape": ["batch", *_named(i.shape, i.dims)],
             "range": list(i.range) if i.range else None, "description": i.description}
    if i.variable:
        entry |= {"max_length": i.max_length, "pad": i.pad}
    if i.padding_mask_of:
        entry["padding_mask_of"] = i.padding_mask_of
    if i.tokenizer is not None:
        entry["tokenizer"] = i.tokenizer.to_dict()
    return entry
