"""The public task API: everything task-specific, declared once, read by train, export and serve.

A task is data plus a few functions. The trainer, the exporter and (through the exported contract)
the server read this declaration and never compare task names, so a new task is a new file:

    # my_task.py, anywhere on sys.path (e.g. the current folder)
    from t2d import Input, Model, Output, Splits, Task
    TASK = Task(name="mine", kind="regression", input=Input("x", (10,)), output=Output("y", 1),
                data=load_my_splits, models={"mlp": Model(MyConfig, build_my_net)})

    python -m train --task my_task:TASK --out runs/mine
    python -m export --task my_task:TASK --checkpoint runs/mine/best.pt

The built-in tasks (`t2d.builtin`) are written with this same API.
"""

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

KINDS = ("regression", "classification")
NORMALIZE = ("feature", "global", "none")
DTYPES = ("float32",)  # what the exported graphs take; onnxruntime and the v2 protocol call it FP32


@dataclass(frozen=True)
class Input:
    """The raw input of one sample, as the served model takes it (raw units: no scaling outside the graph)."""

    name: str
    """The input's name in the ONNX graph and on the wire (the v2 protocol's input name)."""
    shape: tuple[int, ...]
    """One sample, without the batch axis: (10,) for 10 features, (1, 28, 28) for a grey image."""
    dtype: str = "float32"
    range: tuple[float, float] | None = None
    """Valid values, both ends included (pixels: (0, 1)); the server refuses requests outside it."""
    train_range: tuple[tuple[float, float], ...] | None = None
    """Vector inputs: [low, high) of each feature in the training data; served answers flag inputs
    outside it as extrapolated."""
    normalize: str = "feature"
    """z-score statistics fitted on the training split and kept in the graph: `feature` (one mean and
    std per feature, or per channel of an image), `global` (one for every value) or `none`."""
    description: str = ""

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if not self.name or not self.name.isidentifier():
            raise ValueError(f"Input.name must be an identifier, got {self.name!r}")
        if not self.shape or any(s < 1 for s in self.shape):
            raise ValueError(f"Input.shape must be positive sizes, got {self.shape}")
        if self.dtype not in DTYPES:
            raise ValueError(f"Input.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"Input.normalize must be one of {', '.join(NORMALIZE)}, got {self.normalize!r}")
        if self.range is not None and not self.range[0] < self.range[1]:
            raise ValueError(f"Input.range must be (low, high) with low < high, got {self.range}")
        if self.train_range is not None and (len(self.shape) != 1 or len(self.train_range) != self.shape[0]):
            raise ValueError("Input.train_range needs a vector input and one (low, high) per feature")

    @property
    def is_image(self) -> bool:
        """(channels, height, width): crops and flips apply."""
        return len(self.shape) == 3

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
    """What the network returns per sample: `size` values (regression targets, or one logit per class)."""

    name: str
    size: int
    description: str = ""

    def __post_init__(self):
        if not self.name or not self.name.isidentifier():
            raise ValueError(f"Output.name must be an identifier, got {self.name!r}")
        if self.size < 1:
            raise ValueError(f"Output.size must be >= 1, got {self.size}")


@dataclass(frozen=True)
class Model:
    """One network the task can train: its config dataclass (fields settable as --model.FIELD) and a
    function that builds the `nn.Module` from a config and the task (for the input and output sizes).

    The module maps a standardized batch (N, *input.shape) to (N, output.size): regression targets in
    standardized units, or class logits. The trainer adds the normalization around it."""

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


Tensors = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Splits:
    """Raw-unit data: each split is (x, y) tensors or a `torch.utils.data.Dataset` of (x, y) pairs.

    x: (N, *input.shape) float; y: (N, output.size) float targets, or (N,) class indices.
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
    (cross-entropy; metrics accuracy and a confusion matrix)."""
    input: Input
    output: Output
    data: Callable[[DataOptions], Splits]
    models: dict[str, Model]
    classes: tuple[str, ...] | None = None
    """Classification: one name per output."""
    default_model: str = ""
    """A key of `models`; empty: the first."""
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Config values for this task when the user gives none, as {section: {field: value}}
    (e.g. {"run": {"epochs": 50}, "data": {"batch_size": 32}})."""
    parity_inputs: Callable[[int, torch.Generator], torch.Tensor] | None = None
    """n raw inputs for the export's parity check; None: the first n of the test split (repeated if short)."""
    description: str = ""

    def __post_init__(self):
        import re

        if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,62}", self.name or ""):
            raise ValueError(f"Task.name must be lowercase letters, digits, '-', '_' or '.', got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"Task.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not self.models:
            raise ValueError("Task.models must name at least one Model")
        if self.default_model and self.default_model not in self.models:
            raise ValueError(f"Task.default_model {self.default_model!r} is not one of {sorted(self.models)}")
        if self.kind == "classification":
            if self.classes is None or len(self.classes) != self.output.size or self.output.size < 2:
                raise ValueError("a classification Task needs Output.size >= 2 and one class name per output")
            object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        elif self.classes is not None:
            raise ValueError("a regression Task has no classes")

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
