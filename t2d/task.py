"""The public task API: everything task-specific, declared once, read by train, export and serve.

A task is data plus a few functions. The trainer, the exporter and (through the exported contract)
the server read this declaration and never compare task names, so a new task is a new file:

    # my_task.py, anywhere on sys.path (e.g. the current folder)
    from t2d import Input, Model, Output, Splits, Task
    TASK = Task(name="mine", kind="regression", input=Input("x", (10,)), output=Output("y", 1),
                data=load_my_splits, models={"mlp": Model(MyConfig, build_my_net)})

    python -m train --task my_task:TASK --out runs/mine
    python -m export --task my_task:TASK --checkpoint runs/mine/best.pt

A model with several inputs and outputs declares them in order; the network's forward takes the inputs
in that order and returns the outputs in theirs (a tuple, or one tensor for one output):

    Task(..., inputs=(Input("ids", (None,), dtype="int64", max_length=32, range=(0, 999)),
                      Input("padding", (None,), dtype="bool", padding_mask_of="ids"),
                      Input("numbers", (4,))),
              outputs=(Output("logits", 3), Output("embedding", 16)), target="logits")

| Input field | meaning |
|---|---|
| `dtype` | `float32`, `int64` (ids, counts) or `bool` (masks) |
| `shape` | one sample without the batch axis; `None` for a size that varies (a sequence's length) |
| `max_length` | the largest a `None` size may be (required with one); the server refuses longer |
| `pad` | the value a shorter sample is padded with (training pads each batch to its longest) |
| `padding_mask_of` | a `bool` input the toolkit makes, not the data: True where that input is padding |
| `tokenizer` | `t2d.Tokenizer`: the input's data are strings, and the server takes text too |
| `range` | valid values; for ids, the vocabulary (the server refuses ids outside it) |
| `normalize` | float inputs: z-scored inside the graph, per `feature` or `global`ly, or `none` |

The built-in tasks (`t2d.builtin`) are written with this same API.
"""

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn

from t2d.text import Tokenizer

KINDS = ("regression", "classification")
NORMALIZE = ("feature", "global", "none")
# What the exported graphs take; onnxruntime and the v2 protocol call them FP32, INT64 and BOOL.
DTYPES = ("float32", "int64", "bool")
TORCH_DTYPES = {"float32": torch.float32, "int64": torch.int64, "bool": torch.bool}


def _sizes(shape, what: str) -> tuple:
    shape = tuple(None if s is None else int(s) for s in shape)
    if not shape or any(s is not None and s < 1 for s in shape):
        raise ValueError(f"{what}.shape must be positive sizes or None, got {shape}")
    return shape


@dataclass(frozen=True)
class Input:
    """The raw input of one sample, as the served model takes it (raw units: no scaling outside the graph)."""

    name: str
    """The input's name in the ONNX graph and on the wire (the v2 protocol's input name)."""
    shape: tuple[int | None, ...]
    """One sample, without the batch axis: (10,) for 10 features, (1, 28, 28) for a grey image, (None,) for a
    sequence of any length up to `max_length`."""
    dtype: str = "float32"
    range: tuple[float, float] | None = None
    """Valid values, both ends included (pixels: (0, 1); ids: (0, vocabulary size - 1)); the server refuses
    requests outside it."""
    train_range: tuple[tuple[float, float], ...] | None = None
    """Vector inputs: [low, high) of each feature in the training data; served answers flag inputs
    outside it as extrapolated."""
    normalize: str = ""
    """z-score statistics fitted on the training split and kept in the graph: `feature` (one mean and
    std per feature, or per channel of an image), `global` (one for every value) or `none`. Default:
    `feature` for a fixed-size float input, `none` for the others (ids and masks are never scaled)."""
    description: str = ""
    pad: float = 0
    """The value that pads a shorter sample up to its batch's longest (ids: the padding token's id)."""
    max_length: int | None = None
    """The largest size a None entry of `shape` may take."""
    dims: tuple[str, ...] = ()
    """A name for each None entry of `shape` (default "length"): inputs whose variable sizes share a name
    always have the same size, as ids and their mask do. Name them apart for independent lengths."""
    padding_mask_of: str = ""
    """A bool input that is not in the data: the toolkit makes it from the named input, True where that
    input is padding (PyTorch's `src_key_padding_mask`), in training, parity and serving alike."""
    tokenizer: Tokenizer | None = None
    """For int64 ids of text: the data give strings, which the tokenizer maps to ids; the exported contract
    carries the vocabulary, so the server takes strings (v2 BYTES) as well as ids."""

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (a frozen dataclass)
        set_("shape", _sizes(self.shape, "Input"))
        if not self.name or not self.name.isidentifier():
            raise ValueError(f"Input.name must be an identifier, got {self.name!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"Input.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        variable = sum(s is None for s in self.shape)
        if variable and not (self.padding_mask_of and self.max_length is None):  # a mask's: its source's (Task)
            if self.max_length is None or int(self.max_length) < 2:
                raise ValueError(f"Input {self.name} has a None size: give max_length (at least 2), the largest it "
                                 f"may be")
            set_("max_length", int(self.max_length))
        set_("dims", tuple(self.dims) or ("length",) * variable)
        if len(self.dims) != variable or not all(isinstance(d, str) and d.isidentifier() and d != "batch"
                                                 for d in self.dims):
            raise ValueError(f"Input {self.name}: dims names each None size of shape {self.shape} (identifiers, not "
                             f"'batch'), got {self.dims}")
        default = "feature" if self.dtype == "float32" and not variable else "none"
        set_("normalize", self.normalize or default)
        if self.normalize not in NORMALIZE:
            raise ValueError(f"Input.normalize must be one of {', '.join(NORMALIZE)}, got {self.normalize!r}")
        if self.normalize != "none" and self.dtype != "float32":
            raise ValueError(f"Input {self.name} is {self.dtype}: only float32 inputs are normalized "
                             f"(normalize='none')")
        if self.normalize == "feature" and variable:
            raise ValueError(f"Input {self.name} has a None size: normalize it 'global' or 'none', not per feature")
        if self.tokenizer is not None:
            if self.dtype != "int64" or self.shape != (None,):
                raise ValueError(f"Input {self.name} has a tokenizer: it must be int64 ids of shape (None,)")
            if self.range is None:
                set_("range", (0, self.tokenizer.size - 1))
        if self.padding_mask_of and self.dtype != "bool":
            raise ValueError(f"Input {self.name} is a padding mask: its dtype must be bool")
        if self.dtype == "int64" and self.pad != int(self.pad):
            raise ValueError(f"Input {self.name} is int64: its pad must be a whole number, got {self.pad}")
        if self.range is not None and not self.range[0] < self.range[1]:
            raise ValueError(f"Input.range must be (low, high) with low < high, got {self.range}")
        if self.range is not None and variable and not self.range[0] <= self.pad <= self.range[1]:
            raise ValueError(f"Input {self.name}'s pad {self.pad} is outside its range {self.range}")
        if self.train_range is not None and (len(self.shape) != 1 or variable
                                             or len(self.train_range) != self.shape[0]):
            raise ValueError("Input.train_range needs a vector input and one (low, high) per feature")

    @property
    def variable(self) -> bool:
        """Some size of a sample varies (a sequence)."""
        return None in self.shape

    @property
    def axis_dims(self) -> dict[int, str]:
        """The dimension name of each variable axis of a batch (axis 0 is the batch)."""
        names = iter(self.dims)
        return {i + 1: next(names) for i, s in enumerate(self.shape) if s is None}

    @property
    def is_image(self) -> bool:
        """(channels, height, width) floats: crops and flips apply."""
        return len(self.shape) == 3 and self.dtype == "float32" and not self.variable

    @property
    def stats_shape(self) -> tuple[int, ...]:
        """The shape of the input standardizer's mean and std, broadcast against one sample."""
        if self.normalize == "feature":
            return (self.shape[0], *[1] * (len(self.shape) - 1))
        return (1,)

    @property
    def stats_dims(self) -> tuple[int, ...]:
        """The axes of a batch (N, *shape) that the statistics reduce over."""
        if self.normalize == "feature":
            return (0, *range(2, len(self.shape) + 1))
        return tuple(range(len(self.shape) + 1))


@dataclass(frozen=True)
class Output:
    """What the network returns per sample: `size` values (regression targets, or one logit per class), or
    any `shape` (an embedding, a value per token: None for a size that follows an input's)."""

    name: str
    size: int = 0
    description: str = ""
    shape: tuple[int | None, ...] = ()
    dims: tuple[str, ...] = ()
    """A name for each None entry of `shape` (default "length"), as the input whose size it follows."""

    def __post_init__(self):
        if not self.name or not self.name.isidentifier():
            raise ValueError(f"Output.name must be an identifier, got {self.name!r}")
        if self.shape:
            object.__setattr__(self, "shape", _sizes(self.shape, "Output"))
            fixed = None not in self.shape
            if self.size and (not fixed or self.size != math.prod(self.shape)):
                raise ValueError(f"Output {self.name}: size {self.size} and shape {self.shape} disagree")
            object.__setattr__(self, "size", math.prod(self.shape) if fixed else 0)
        elif self.size < 1:
            raise ValueError(f"Output.size must be >= 1, got {self.size}")
        else:
            object.__setattr__(self, "shape", (int(self.size),))
        variable = sum(s is None for s in self.shape)
        object.__setattr__(self, "dims", tuple(self.dims) or ("length",) * variable)
        if len(self.dims) != variable:
            raise ValueError(f"Output {self.name}: dims names each None size of shape {self.shape}, got {self.dims}")


@dataclass(frozen=True)
class Model:
    """One network the task can train: its config dataclass (fields settable as --model.FIELD) and a
    function that builds the `nn.Module` from a config and the task (for the input and output sizes).

    The module maps a standardized batch (N, *input.shape) to (N, output.size): regression targets in
    standardized units, or class logits. With several inputs, forward takes them in the task's order; with
    several outputs it returns a tuple in theirs. The trainer adds the normalization around it."""

    config: type
    build: Callable[[Any, "Task"], nn.Module]


@dataclass(frozen=True)
class DataOptions:
    """What the trainer (or the exporter, for parity inputs) asks of `Task.data`; each task uses what it needs."""

    dir: str = ""
    """A folder of data files, from --data-dir; empty: the task's default."""
    seed: int = 0
    """The run's seed: a task that draws or splits data at random should use it."""
    size: int = 1000
    """Synthetic tasks: training points to draw."""
    val_size: int = 200
    """Validation samples: drawn fresh, or held out of the training split by the trainer (Splits.val None)."""
    test_size: int = 10000
    test_seed: int = 123
    download: bool = True

    @classmethod
    def from_config(cls, config: dict[str, Any], **overrides: Any) -> "DataOptions":
        """The options of a run from its saved config dict (a checkpoint's `config`): its data section and
        seed; `overrides` win (export: `dir` from --data-dir, `download` False)."""
        data, run = config.get("data") or {}, config.get("run") or {}
        names = ("dir", "size", "val_size", "test_size", "test_seed", "download")
        values = {k: data[k] for k in names if k in data} | {"seed": run.get("seed", 0)}
        return cls(**{**values, **{k: v for k, v in overrides.items() if v is not None}})


@dataclass
class Splits:
    """Raw-unit data: each split is an (x, y) pair or a `torch.utils.data.Dataset` of (x, y) pairs.

    x, one input: a tensor (N, *input.shape). Several inputs: a dict {input name: values} (or a tuple in the
    task's order) of every input the data gives (not the padding masks the toolkit makes). An input of
    variable size may be a list of per-sample tensors, or a tensor already padded with its `pad`; a tokenized
    input, a list of strings. A Dataset's x is one sample in the same forms (a tensor, a dict or a string).
    y: (N, output.size) float targets, or (N,) class indices, for the task's target output.
    `val` None: the trainer holds out `data.val_size` random training samples (seeded by the run)."""

    train: Any
    test: Any
    val: Any = None


@dataclass(frozen=True)
class Task:
    """Everything task-specific. See the module docstring and examples/."""

    name: str
    """The model's name in the store and on the wire (`/v2/models/<name>`); lowercase letters, digits, '-', '_', '.'."""
    kind: str
    """regression (MSE on the standardized target; metrics mse, mae, mre) or classification
    (cross-entropy; metrics accuracy and a confusion matrix), of the `target` output."""
    input: Input | None = None
    """The short form for one input (then `inputs` is `(input,)`); with `inputs` given, their first."""
    output: Output | None = None
    """The short form for one output; with `outputs` given, the `target` one."""
    data: Callable[[DataOptions], Splits] | None = None
    models: dict[str, Model] = field(default_factory=dict)
    classes: tuple[str, ...] | None = None
    """Classification: one name per output."""
    default_model: str = ""
    """A key of `models`; empty: the first."""
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Config values for this task when the user gives none, as {section: {field: value}}
    (e.g. {"run": {"epochs": 50}, "data": {"batch_size": 32}})."""
    parity_inputs: Callable[[int, torch.Generator], Any] | None = None
    """n raw inputs for the export's parity check (a tensor, or a dict by input name); None: the first n of
    the test split (repeated if short)."""
    description: str = ""
    inputs: tuple[Input, ...] = ()
    """Every input, in the order the network's forward takes them."""
    outputs: tuple[Output, ...] = ()
    """Every output, in the order the network returns them."""
    target: str = ""
    """The output the loss and metrics read; default: the first. The others are exported and served as they are."""
    collate: Callable[[list], Any] | None = None
    """Replaces the trainer's batching: called with a batch's list of (x, y) samples (x a dict by input name),
    returns (x dict of tensors, y); default: pad each variable size to the batch's longest."""

    def __post_init__(self):
        import re

        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (a frozen dataclass)
        if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,62}", self.name or ""):
            raise ValueError(f"Task.name must be lowercase letters, digits, '-', '_' or '.', got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"Task.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for one, many in (("input", "inputs"), ("output", "outputs")):
            # Both: only as this class sets them (dataclasses.replace of a Task passes both back in).
            if getattr(self, many) and getattr(self, one) is not None and getattr(self, one) not in getattr(self, many):
                raise ValueError(f"give Task.{one} or Task.{many}, not both")
            if getattr(self, many):
                set_(one, None)
            set_(many, tuple(getattr(self, many)) or ((getattr(self, one),) if getattr(self, one) else ()))
            if not getattr(self, many):
                raise ValueError(f"a Task needs {one}= or {many}=")
        if not all(isinstance(i, Input) for i in self.inputs) or not all(isinstance(o, Output) for o in self.outputs):
            raise ValueError("Task.inputs are t2d.Input and Task.outputs t2d.Output")
        names = [i.name for i in self.inputs] + [o.name for o in self.outputs]
        if len(set(names)) != len(names):
            raise ValueError(f"the inputs' and outputs' names must differ from each other, got {names}")
        by_name = {i.name: i for i in self.inputs}
        for i in self.inputs:
            source = by_name.get(i.padding_mask_of) if i.padding_mask_of else None
            if i.padding_mask_of and (source is None or source.padding_mask_of or source.shape != i.shape
                                      or (i.max_length is not None and source.dims != i.dims)):
                raise ValueError(f"Input {i.name} is the padding mask of {i.padding_mask_of!r}, which must be another "
                                 f"input of the same shape and dims")
        # A padding mask's sizes are its source's: it need not repeat them.
        set_("inputs", tuple(replace(i, max_length=by_name[i.padding_mask_of].max_length,
                                     dims=by_name[i.padding_mask_of].dims) if i.padding_mask_of and i.variable else i
                             for i in self.inputs))
        if not self.data_inputs:
            raise ValueError("a Task needs an input that its data gives (not only padding masks)")
        target = self.target or self.outputs[0].name
        scored = next((o for o in self.outputs if o.name == target), None)
        if scored is None:
            raise ValueError(f"Task.target {target!r} is not one of the outputs {[o.name for o in self.outputs]}")
        if len(scored.shape) != 1 or scored.size < 1:
            raise ValueError(f"the target output {target} must be a vector of fixed size (targets or logits)")
        set_("target", target)
        set_("input", self.inputs[0])
        set_("output", scored)
        if self.data is None or not callable(self.data):
            raise ValueError("Task.data must be a function of DataOptions that returns Splits")
        if not self.models:
            raise ValueError("Task.models must name at least one Model")
        if self.default_model and self.default_model not in self.models:
            raise ValueError(f"Task.default_model {self.default_model!r} is not one of {sorted(self.models)}")
        if self.kind == "classification":
            if self.classes is None or len(self.classes) != self.output.size or self.output.size < 2:
                raise ValueError("a classification Task needs a target with Output.size >= 2 and one class name "
                                 "per output")
            set_("classes", tuple(str(c) for c in self.classes))
        elif self.classes is not None:
            raise ValueError("a regression Task has no classes")

    @property
    def data_inputs(self) -> tuple[Input, ...]:
        """The inputs the data give: all but the padding masks, which the toolkit makes."""
        return tuple(i for i in self.inputs if not i.padding_mask_of)

    @property
    def image_input(self) -> Input | None:
        """The input crops and flips apply to: the only input, when it is an image."""
        return self.inputs[0] if len(self.inputs) == 1 and self.inputs[0].is_image else None

    @property
    def regression(self) -> bool:
        return self.kind == "regression"

    @property
    def arch(self) -> str:
        """The model trained when the config names none."""
        return self.default_model or next(iter(self.models))

    @property
    def monitors(self) -> tuple[str, ...]:
        """Validation metrics that can pick best.pt and drive early stopping."""
        return ("loss", "mse", "mae", "mre") if self.regression else ("loss", "accuracy")

    def model_config(self, arch: str, values: dict[str, Any] | None = None):
        """The architecture's config dataclass filled from `values`; ValueError for an unknown arch or key."""
        from dataclasses import fields

        if arch not in self.models:
            raise ValueError(f"unknown model.arch {arch!r} for task {self.name}; choose one of {', '.join(self.models)}")
        cls = self.models[arch].config
        values = dict(values or {})
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown model.{unknown[0]} for architecture {arch!r}; known: "
                             f"{', '.join(f.name for f in fields(cls))}")
        return cls(**values)

    def build(self, arch: str, values: dict[str, Any] | None = None) -> nn.Module:
        """A freshly initialized network of `arch` with config `values`."""
        cfg = self.model_config(arch, values)  # first: an unknown arch is its ValueError, not a KeyError
        return self.models[arch].build(cfg, self)
