"""What a served model takes and gives, learned from its contract.json and checked against its ONNX graph.

The exporter writes contract.json into each model-store entry (contract_version 3):

    {"contract_version": 3, "task": "product", "kind": "regression" | "classification",
     "inputs":  [{"name": "x", "dtype": "float32" | "int64" | "bool", "shape": ["batch", 2],
                  "range": null | [low, high], "max_length": n and "pad": v (when a size varies), "padding_mask_of": "ids", "tokenizer": {...}}],
     "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 1], ...}], "target": "y",
     "classes": null | [one name per column of the target output], "train_range": null | [[low, high), ...], ...}

A shape entry that is a name ("length") is a size that varies, up to the input's max_length; inputs that
share the name have the same size in a request. Version 2 contracts are the same with float32 fixed-size
inputs only; older ones (no "contract_version") have no "range"; an image classifier's says "pixel_scale":
255 instead, and its graph takes pixels in [0, 1], so that is its range. Nothing here knows the built-in
tasks: any names, any number of inputs and outputs, any sample shape behind a dynamic batch axis.

The graph's own metadata (onnxruntime's view of model.onnx: names, element types, shapes) must agree
with the contract, or the model is refused: a server that trusted one and ran the other would answer
with the wrong names or fail on every request.
"""

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from t2d.text import Tokenizer

FLOAT32_MAX = float(np.finfo(np.float32).max)  # about 3.4e38

# contract dtype -> (Open Inference Protocol datatype, onnxruntime's element type, numpy dtype).
# Another dtype is refused at load, not guessed at per request.
DTYPES = {"float32": ("FP32", "tensor(float)", np.float32), "int64": ("INT64", "tensor(int64)", np.int64),
          "bool": ("BOOL", "tensor(bool)", np.bool_)}


class ContractError(ValueError):
    """contract.json is malformed, or it and model.onnx disagree."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: `sample_shape` is the shape of one row, without the batch axis; a str entry is a size
    that varies (its name), at most `max_length`."""

    name: str
    dtype: str  # the contract's, e.g. "float32"
    sample_shape: tuple[int | str, ...]
    range: tuple[float, float] | None = None  # inclusive [low, high] of valid values (inputs only)
    max_length: int = 0  # the largest a varying size may be
    pad: float = 0  # what pads a shorter row of a varying size
    padding_mask_of: str = ""  # a bool input the server can make: True where that input is padding
    tokenizer: Tokenizer | None = None  # the input also takes text (BYTES), tokenized as in training

    @property
    def datatype(self) -> str:
        return DTYPES[self.dtype][0]

    @property
    def np_dtype(self) -> type:
        return DTYPES[self.dtype][2]

    @property
    def variable(self) -> bool:
        return any(isinstance(d, str) for d in self.sample_shape)

    @property
    def size(self) -> int:
        """Elements per row (at the largest size where a size varies)."""
        return math.prod(self.max_length if isinstance(d, str) else d for d in self.sample_shape)

    def metadata(self) -> dict[str, Any]:
        """As the Open Inference Protocol's model metadata lists it: -1 for the batch axis and every varying size."""
        return {"name": self.name, "datatype": self.datatype,
                "shape": [-1, *(-1 if isinstance(d, str) else d for d in self.sample_shape)]}


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    target: str = ""  # the output the classes (or regression targets) describe


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
    target = next((o for o in outputs if o.name == contract.get("target", outputs[0].name)), None)
    if target is None:
        raise ContractError(f"contract.json's target {contract.get('target')!r} is none of its outputs")
    if kind == "classification":
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
            raise ContractError("contract.json's classes must be a list of names for a classification model")
        if target.sample_shape != (len(classes),):
            raise ContractError(f"contract.json names {len(classes)} classes but its target output {target.name!r} "
                                f"has rows of shape {list(target.sample_shape)}")
    train_range = contract.get("train_range")
    if train_range is not None:
        ok = (isinstance(train_range, list) and len(inputs[0].sample_shape) == 1 and not inputs[0].variable
              and len(train_range) == inputs[0].sample_shape[0]
              and all(_is_pair(r) and r[0] < r[1] for r in train_range))
        if not ok:
            raise ContractError("contract.json's train_range must be one [low, high) per feature of a 1-D first input")
    return Signature(inputs, outputs, target.name)


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
        what = f"contract.json's {key[:-1]} {name!r}"
        if not (isinstance(name, str) and name):
            raise ContractError(f"contract.json's {key} has an entry without a name")
        if dtype not in DTYPES or (key == "outputs" and dtype != "float32"):
            raise ContractError(f"{what} has dtype {dtype!r}; served: {', '.join(DTYPES)} (outputs: float32)")
        # The batch axis is named (a string such as "batch"), null or -1; every other axis a fixed size or a name.
        if not (isinstance(shape, list) and shape and (isinstance(shape[0], str) or shape[0] in (None, -1))
                and all((type(d) is int and d > 0) or (isinstance(d, str) and d and d != shape[0])
                        for d in shape[1:])):
            raise ContractError(f"{what} has shape {shape!r}; expected [\"batch\", sizes or names...]")
        variable = any(isinstance(d, str) for d in shape[1:])
        max_length, pad = e.get("max_length", 0), e.get("pad", 0)
        if variable and key == "inputs" and not (type(max_length) is int and max_length >= 1 and _is_number(pad)):
            raise ContractError(f"{what} has a size that varies, and needs max_length (a positive integer) and pad")
        value_range = e.get("range", legacy_range) if key == "inputs" else None
        if value_range is not None:
            if not (_is_pair(value_range) and value_range[0] <= value_range[1]):
                raise ContractError(f"{what} has range {value_range!r}; expected [low, high]")
            value_range = (float(value_range[0]), float(value_range[1]))
        tokenizer = None
        if key == "inputs" and e.get("tokenizer") is not None:
            try:
                tokenizer = Tokenizer.from_dict(e["tokenizer"])
            except (ValueError, TypeError) as err:
                raise ContractError(f"{what} has a tokenizer that cannot be read: {err}") from None
            if dtype != "int64" or len(shape) != 2 or not variable:
                raise ContractError(f"{what} has a tokenizer, so it must be int64 ids of shape [batch, length]")
        mask_of = e.get("padding_mask_of", "") if key == "inputs" else ""
        if not isinstance(mask_of, str) or (mask_of and dtype != "bool"):
            raise ContractError(f"{what} is a padding mask, so it must be bool")
        specs.append(TensorSpec(name, dtype, tuple(shape[1:]), value_range, max_length if variable else 0,
                                pad if variable else 0, mask_of, tokenizer))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ContractError(f"contract.json's {key} repeat a name: {names}")
    by_name = {s.name: s for s in specs}
    for s in specs:
        source = by_name.get(s.padding_mask_of) if s.padding_mask_of else None
        if s.padding_mask_of and (source is None or source.sample_shape != s.sample_shape):
            raise ContractError(f"contract.json's input {s.name!r} is the padding mask of {s.padding_mask_of!r}, "
                                f"which must be an input of the same shape")
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
            same = len(shape) == 1 + len(spec.sample_shape) and all(
                not isinstance(g, int) if isinstance(w, str) else g == w for g, w in zip(shape[1:], spec.sample_shape))
            if not same:
                raise ContractError(f"{key[:-1]} {spec.name!r} is [batch, {', '.join(map(str, spec.sample_shape))}] in "
                                    f"contract.json, {shape} in model.onnx")


def trial_inputs(signature: Signature, rows: int = 2) -> dict[str, np.ndarray]:
    """A valid batch: ones (ids: the lowest valid; masks: no padding), moved into each input's range; sizes that
    vary at 2 (or their maximum, if smaller)."""
    feeds = {}
    for s in signature.inputs:
        shape = (rows, *(min(2, s.max_length) if isinstance(d, str) else d for d in s.sample_shape))
        if s.dtype == "bool":
            feeds[s.name] = np.zeros(shape, dtype=np.bool_)
            continue
        value = (1.0 if s.dtype == "float32" else 0) if s.range is None else min(max(1.0, s.range[0]), s.range[1])
        feeds[s.name] = np.full(shape, value, dtype=s.np_dtype)
    return feeds


def output_shape(spec: TensorSpec, rows: int, sizes: dict[str, int]) -> tuple[int, ...]:
    """The shape an output has for a batch of `rows` whose varying sizes are `sizes` (by name)."""
    return (rows, *(sizes.get(d, -1) if isinstance(d, str) else d for d in spec.sample_shape))
