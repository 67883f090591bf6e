"""What a served model takes and gives, learned from its contract.json and checked against its ONNX graph.

The exporter writes contract.json into each model-store entry (contract_version 2):

    {"contract_version": 2, "task": "product", "kind": "regression" | "classification",
     "inputs":  [{"name": "x", "dtype": "float32", "shape": ["batch", 2], "range": null | [low, high], ...}],
     "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 1], ...}],
     "classes": null | [one name per column of outputs[0]], "train_range": null | [[low, high), ...], ...}

Older contracts (no "contract_version") have no "range"; an image classifier's says "pixel_scale": 255
instead, and its graph takes pixels in [0, 1], so that is its range. Nothing here knows the built-in
tasks: any names, any number of inputs and outputs, any sample shape behind a dynamic batch axis.

The graph's own metadata (onnxruntime's view of model.onnx: names, element types, shapes) must agree
with the contract, or the model is refused: a server that trusted one and ran the other would answer
with the wrong names or fail on every request.
"""

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

FLOAT32_MAX = float(np.finfo(np.float32).max)  # about 3.4e38

# contract dtype -> (Open Inference Protocol datatype, onnxruntime's element type, numpy dtype).
# Only float32 is exported today; another dtype is refused at load, not guessed at per request.
DTYPES = {"float32": ("FP32", "tensor(float)", np.float32)}


class ContractError(ValueError):
    """contract.json is malformed, or it and model.onnx disagree."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: `sample_shape` is the shape of one row, without the batch axis."""

    name: str
    dtype: str  # the contract's, e.g. "float32"
    sample_shape: tuple[int, ...]
    range: tuple[float, float] | None = None  # inclusive [low, high] of valid values (inputs only)

    @property
    def datatype(self) -> str:
        return DTYPES[self.dtype][0]

    @property
    def np_dtype(self) -> type:
        return DTYPES[self.dtype][2]

    @property
    def size(self) -> int:
        """Elements per row."""
        return math.prod(self.sample_shape)

    def metadata(self) -> dict[str, Any]:
        """As the Open Inference Protocol's model metadata lists it: -1 for the batch axis."""
        return {"name": self.name, "datatype": self.datatype, "shape": [-1, *self.sample_shape]}


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def signature_of(contract: Any) -> Signature:
    """The inputs and outputs a contract declares, checked for shape and sense; ContractError if not."""
    if not isinstance(contract, dict):
        raise ContractError("contract.json is not a JSON object")
    kind = contract.get("kind")
    if kind not in ("regression", "classification"):
        raise ContractError(f"contract.json's kind is {kind!r}, not 'regression' or 'classification'")
    legacy_range = [0, 1] if "contract_version" not in contract and contract.get("pixel_scale") else None
    inputs = _tensors(contract, "inputs", legacy_range)
    outputs = _tensors(contract, "outputs", None)
    classes = contract.get("classes")
    if kind == "classification":
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise ContractError("contract.json's classes must be a list of names for a classification model")
        if outputs[0].sample_shape != (len(classes),):
            raise ContractError(f"contract.json names {len(classes)} classes but its first output {outputs[0].name!r} "
                                f"has rows of shape {list(outputs[0].sample_shape)}")
    train_range = contract.get("train_range")
    if train_range is not None:
        ok = (isinstance(train_range, list) and len(inputs[0].sample_shape) == 1
              and len(train_range) == inputs[0].sample_shape[0]
              and all(_is_pair(r) and r[0] < r[1] for r in train_range))
        if not ok:
            raise ContractError("contract.json's train_range must be one [low, high) per feature of a 1-D first input")
    return Signature(inputs, outputs)


def _is_number(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def _is_pair(r: Any) -> bool:
    return isinstance(r, list) and len(r) == 2 and all(_is_number(v) for v in r)


def _tensors(contract: dict, key: str, legacy_range: tuple[float, float] | None) -> tuple[TensorSpec, ...]:
    entries = contract.get(key)
    if not (isinstance(entries, list) and entries and all(isinstance(e, dict) for e in entries)):
        raise ContractError(f"contract.json's {key} must be a non-empty list of objects")
    specs = []
    for e in entries:
        name, dtype, shape = e.get("name"), e.get("dtype"), e.get("shape")
        if not (isinstance(name, str) and name):
            raise ContractError(f"contract.json's {key} has an entry without a name")
        if dtype not in DTYPES:
            raise ContractError(f"contract.json's {key[:-1]} {name!r} has dtype {dtype!r}; served: {', '.join(DTYPES)}")
        # The batch axis is named (a string such as "batch"), null or -1; every other axis a fixed size.
        if not (isinstance(shape, list) and shape and (isinstance(shape[0], str) or shape[0] in (None, -1))
                and all(type(d) is int and d > 0 for d in shape[1:])):
            raise ContractError(f"contract.json's {key[:-1]} {name!r} has shape {shape!r}; "
                                f"expected [\"batch\", fixed sizes...]")
        value_range = e.get("range", legacy_range) if key == "inputs" else None
        if value_range is not None:
            if not (_is_pair(value_range) and value_range[0] <= value_range[1]):
                raise ContractError(f"contract.json's input {name!r} has range {value_range!r}; expected [low, high]")
            value_range = (float(value_range[0]), float(value_range[1]))
        specs.append(TensorSpec(name, dtype, tuple(shape[1:]), value_range))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ContractError(f"contract.json's {key} repeat a name: {names}")
    return tuple(specs)


def check_graph(signature: Signature, graph_inputs: list, graph_outputs: list) -> None:
    """ContractError unless the graph's inputs and outputs (onnxruntime NodeArg lists: .name, .type, .shape)
    are the contract's, in order, with the same element types, ranks and sizes, and a dynamic batch axis."""
    for key, specs, args in (("inputs", signature.inputs, graph_inputs), ("outputs", signature.outputs, graph_outputs)):
        if [s.name for s in specs] != [a.name for a in args]:
            raise ContractError(f"contract.json's {key} are {[s.name for s in specs]}, "
                                f"model.onnx's are {[a.name for a in args]}")
        for spec, arg in zip(specs, args):
            if arg.type != DTYPES[spec.dtype][1]:
                raise ContractError(f"{key[:-1]} {spec.name!r} is {spec.dtype} in contract.json, "
                                    f"{arg.type} in model.onnx")
            shape = list(arg.shape)
            if not shape or isinstance(shape[0], int):  # a symbolic name or None: dynamic
                raise ContractError(f"{key[:-1]} {spec.name!r} has no dynamic batch axis in model.onnx (shape {shape})")
            if shape[1:] != list(spec.sample_shape):
                raise ContractError(f"{key[:-1]} {spec.name!r} is [batch, {', '.join(map(str, spec.sample_shape))}] in "
                                    f"contract.json, {shape} in model.onnx")


def trial_inputs(signature: Signature, rows: int = 2) -> dict[str, np.ndarray]:
    """A valid batch: ones, moved into each input's range."""
    feeds = {}
    for s in signature.inputs:
        value = 1.0 if s.range is None else min(max(1.0, s.range[0]), s.range[1])
        feeds[s.name] = np.full((rows, *s.sample_shape), value, dtype=s.np_dtype)
    return feeds
