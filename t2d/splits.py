"""A task's splits as checked tensors: what train, and export's parity check and quantization gate, feed
their models.

Every input becomes one tensor of the whole split in the task's input order (`Features`); a size that varies
is padded with the input's `pad` up to the split's longest sample, and each sample's size is kept, so a batch
is cut back to its own longest (`Features.batch`). Padding masks (`Input.padding_mask_of`) are made here from
those sizes, never read from the data. Targets are checked against the task's target output.
"""

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from t2d.errors import DataError
from t2d.task import TORCH_DTYPES, Input, Task
from t2d.text import TextError


@dataclass
class Features:
    """The inputs of N samples, one tensor per input in the task's order. `axes[i]` maps each variable axis of
    input i to its dimension's name, and `lengths[name]` is each sample's size along it (N,)."""

    tensors: tuple[torch.Tensor, ...]
    axes: tuple[dict[int, str], ...] = ()
    lengths: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.tensors[0])

    @property
    def variable(self) -> bool:
        return bool(self.lengths)

    def batch(self, idx) -> tuple[torch.Tensor, ...]:
        """The rows `idx` (an index tensor or a slice) of every input, each variable size cut to the longest
        of these rows."""
        rows = tuple(t[idx] for t in self.tensors)
        if not self.lengths:
            return rows
        longest = {name: int(n[idx].max()) for name, n in self.lengths.items()}
        return tuple(_cut(t, axes, longest) for t, axes in zip(rows, self.axes))

    def select(self, idx: torch.Tensor) -> "Features":
        """The samples `idx`, as a Features of their own (padding left as it is)."""
        return Features(tuple(t[idx] for t in self.tensors), self.axes, {k: v[idx] for k, v in self.lengths.items()})

    def map(self, fn) -> "Features":
        """The same samples with `fn(tensors) -> tensors` applied (moving to a device, standardizing)."""
        return Features(tuple(fn(self.tensors)), self.axes, self.lengths)

    def to(self, device) -> "Features":
        return Features(tuple(t.to(device) for t in self.tensors), self.axes,
                        {k: v.to(device) for k, v in self.lengths.items()})

    def feeds(self, task: Task, idx=slice(None)) -> dict[str, np.ndarray]:
        """The rows `idx` as onnxruntime feeds: input name -> array."""
        return {i.name: t.cpu().numpy() for i, t in zip(task.inputs, self.batch(idx))}


    def whole(self) -> "Features":
        """Every sample as one Features (what input statistics are fitted on)."""
        return self


class CollatedFeatures:
    """A task's samples batched by its own `Task.collate` instead of the default padding: each batch is the collate's
    answer for its samples (a dict of the data inputs' tensors), checked like any split, with the padding masks
    made from the collated inputs' padding and `fn`s from `map` applied (standardization)."""

    def __init__(self, task: Task, samples: list[dict], what: str, device=None, fns=()):
        self.task, self.samples, self.what, self.device, self.fns = task, samples, what, device, tuple(fns)
        self.axes = tuple(i.axis_dims for i in task.inputs)
        self._whole = None

    def __len__(self) -> int:
        return len(self.samples)

    def batch(self, idx) -> tuple[torch.Tensor, ...]:
        rows = range(len(self.samples))[idx] if isinstance(idx, slice) else idx.tolist()
        x = self._collated([self.samples[i] for i in rows])
        for fn in self.fns:
            x = tuple(fn(x))
        return x

    def _collated(self, samples: list[dict]) -> tuple[torch.Tensor, ...]:
        try:
            out = self.task.collate(samples)
        except Exception as e:
            raise DataError(f"task {self.task.name}'s collate failed on {self.what}: {type(e).__name__}: {e}") from None
        if not isinstance(out, dict) or set(out) != {i.name for i in self.task.data_inputs}:
            raise DataError(f"task {self.task.name}'s collate must return a dict of every input the data give "
                            f"{[i.name for i in self.task.data_inputs]}, got {type(out).__name__}")
        columns = {}
        for inp in self.task.data_inputs:
            x = out[inp.name] if isinstance(out[inp.name], torch.Tensor) else torch.as_tensor(np.asarray(out[inp.name]))
            _check_shape(inp, tuple(x.shape[1:]), f"{self.what}'s collated input {inp.name}")
            columns[inp.name] = (_as_dtype(inp, x, f"{self.what}'s collated input {inp.name}"),
                                 _sizes_from_padding(inp, x) if inp.variable else None)
        features = _features(self.task, columns, self.what, cut=False)
        return tuple(t.to(self.device) if self.device is not None else t for t in features.tensors)

    def select(self, idx: torch.Tensor) -> "CollatedFeatures":
        return CollatedFeatures(self.task, [self.samples[i] for i in idx.tolist()], self.what, self.device, self.fns)

    def map(self, fn) -> "CollatedFeatures":
        return CollatedFeatures(self.task, self.samples, self.what, self.device, (*self.fns, fn))

    def to(self, device) -> "CollatedFeatures":
        return CollatedFeatures(self.task, self.samples, self.what, device, self.fns)

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.whole().tensors

    @property
    def lengths(self) -> dict[str, torch.Tensor]:
        return self.whole().lengths

    def whole(self) -> Features:
        if self._whole is None:
            x = self._collated(self.samples)
            sizes = {name: _sizes_from_padding(inp, t)[:, k].to(t.device)
                     for inp, t in zip(self.task.inputs, x) if not inp.padding_mask_of
                     for k, name in enumerate(inp.dims)}
            self._whole = Features(x, self.axes, sizes)
        return self._whole

    def feeds(self, task: Task, idx=slice(None)) -> dict[str, np.ndarray]:
        return {i.name: t.cpu().numpy() for i, t in zip(task.inputs, self.batch(idx))}


def _cut(t: torch.Tensor, axes: dict[int, str], longest: dict[str, int]) -> torch.Tensor:
    for axis, name in axes.items():
        if t.shape[axis] != longest[name]:
            t = t.narrow(axis, 0, longest[name])
    return t


def join(a: Features, b: Features) -> Features:
    """The samples of `a` then those of `b` (k-fold joins training and validation); padded to the wider."""
    if isinstance(a, CollatedFeatures):
        return CollatedFeatures(a.task, a.samples + b.samples, a.what, a.device, a.fns)
    tensors = []
    for ta, tb, axes in zip(a.tensors, b.tensors, a.axes):
        for axis in axes:
            width = max(ta.shape[axis], tb.shape[axis])
            ta, tb = (_widen(t, axis, width) for t in (ta, tb))
        tensors.append(torch.cat([ta, tb]))
    return Features(tuple(tensors), a.axes, {k: torch.cat([a.lengths[k], b.lengths[k]]) for k in a.lengths})


def _widen(t: torch.Tensor, axis: int, width: int, value=0) -> torch.Tensor:
    if t.shape[axis] >= width:
        return t
    shape = list(t.shape)
    shape[axis] = width - t.shape[axis]
    return torch.cat([t, torch.full(shape, value, dtype=t.dtype, device=t.device)], axis)


def real_values(features: Features, k: int) -> torch.Tensor:
    """Input k's values at the positions within each sample's size (its padding left out): what statistics of a
    variable-size input are fitted on."""
    x = features.tensors[k]
    if not features.axes[k]:
        return x
    shape = x.shape
    keep = torch.ones(shape, dtype=torch.bool, device=x.device)
    for axis, name in features.axes[k].items():
        view = [-1 if a == axis else 1 for a in range(len(shape))]
        positions = torch.arange(shape[axis], device=x.device).view(*view)
        keep &= positions < features.lengths[name].view(-1, *[1] * (len(shape) - 1))
    return x[keep]


def split_tensors(task: Task, split, name: str) -> tuple[Features, torch.Tensor]:
    """(inputs, y) of one split: every input checked against its declaration (dtype, shape, range), and float32
    targets (N, outputs) or int64 labels (N,) in range. DataError (one line) for anything else."""
    what = f"task {task.name}'s {name} split"
    if isinstance(split, (tuple, list)) and len(split) == 2 and not isinstance(split, torch.utils.data.Dataset):
        x, y = split
        values = _by_input(task, x, what, per_sample=False)
        y = torch.as_tensor(np.asarray(y)) if not isinstance(y, torch.Tensor) else y
    elif isinstance(split, torch.utils.data.Dataset) and hasattr(split, "__len__"):
        pairs = [split[i] for i in range(len(split))]
        if not pairs:
            raise DataError(f"{what} is empty")
        samples = [_by_input(task, p[0], what, per_sample=True) for p in pairs]
        values = {i.name: [s[i.name] for s in samples] for i in task.data_inputs}
        y = torch.stack([torch.as_tensor(np.asarray(p[1])) if not isinstance(p[1], torch.Tensor) else p[1]
                         for p in pairs])
    else:
        raise DataError(f"{what} must be an (x, y) pair of tensors or a Dataset of (x, y), got {type(split).__name__}")
    if task.collate is not None:  # the task batches its own samples: keep them as they are
        y = _targets(task, y, what)
        samples = [{k: values[k][j] for k in values} for j in range(len(y))]
        return CollatedFeatures(task, samples, what), y
    one = len(task.data_inputs) == 1
    columns = {i.name: _column(i, values[i.name], what if one else f"{what}'s input {i.name}")
               for i in task.data_inputs}
    counts = {len(t) for t, _ in columns.values()} | {len(y)}
    if len(counts) != 1 or not len(y):
        inputs = " and ".join(f"{len(t)}" + ("" if one else f" {k}") for k, (t, _) in columns.items())
        raise DataError(f"{what} has {inputs} inputs and {len(y)} targets; it needs as many of each, at least one")
    return _features(task, columns, what), _targets(task, y, what)


def _by_input(task: Task, x: Any, what: str, per_sample: bool) -> dict[str, Any]:
    """x (a split's inputs, or one sample's) by input name: a dict, a tuple in the task's order, or the value
    of the one input the data give."""
    names = [i.name for i in task.data_inputs]
    if isinstance(x, dict):
        missing, unknown = sorted(set(names) - set(x)), sorted(set(x) - set(names))
        if missing or unknown:
            raise DataError(f"{what} gives inputs {sorted(x)}; the task takes {names}" +
                            (f" (padding masks are made by the toolkit: leave out {unknown})" if unknown and any(
                                i.name in unknown for i in task.inputs) else ""))
        return x
    if len(names) == 1:
        return {names[0]: x}
    if isinstance(x, (tuple, list)) and len(x) == len(names):
        return dict(zip(names, x))
    raise DataError(f"{what} must give its inputs as a dict {{name: values}} of {names}")


def _column(inp: Input, values: Any, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One input of every sample as a tensor (N, *shape), padded where sizes vary, and each sample's sizes along
    the variable axes (N, k), or None for a fixed-size input. `where` names the input in errors."""
    if inp.tokenizer is not None:
        if isinstance(values, np.ndarray):
            values = values.tolist()
        if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
            raise DataError(f"{where} has a tokenizer: give it strings (a list of str)")
        try:
            values = [torch.tensor(inp.tokenizer.encode(v, inp.max_length)) for v in values]
        except TextError as e:
            bad = next(v for v in values if _fails(inp, v))
            raise DataError(f"{where} holds {bad[:40]!r}: {e}") from None
    if isinstance(values, (list, tuple)) and values and all(isinstance(v, (torch.Tensor, np.ndarray, list))
                                                             for v in values) and inp.variable:
        samples = [torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for v in values]
        x, sizes = _pad(inp, samples, where)
    else:
        try:
            x = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
        except (ValueError, TypeError) as e:
            raise DataError(f"{where} cannot be read as a tensor ({e}); give a tensor, or a list of per-sample "
                            f"tensors for a size that varies") from None
        _check_shape(inp, tuple(x.shape[1:]), where)
        sizes = _sizes_from_padding(inp, x) if inp.variable else None
    return _as_dtype(inp, x, where), sizes


def _fails(inp: Input, text) -> bool:
    try:
        inp.tokenizer.encode(text, inp.max_length)
        return False
    except TextError:
        return True


def _check_shape(inp: Input, shape: tuple, where: str) -> None:
    ok = len(shape) == len(inp.shape) and all(
        (want is None and 1 <= got <= inp.max_length) or got == want for got, want in zip(shape, inp.shape))
    if not ok:
        want = [("n<=%d" % inp.max_length) if s is None else s for s in inp.shape]
        raise DataError(f"{where} has inputs of shape {list(shape)}; the task's input {inp.name} is {want}")


def _pad(inp: Input, samples: list[torch.Tensor], where: str) -> tuple[torch.Tensor, torch.Tensor]:
    for s in samples:
        _check_shape(inp, tuple(s.shape), where)
    sizes = torch.tensor([[s.shape[a] for a, want in enumerate(inp.shape) if want is None] for s in samples])
    longest = [max(s.shape[a] for s in samples) for a in range(len(inp.shape))]
    x = torch.full((len(samples), *longest), inp.pad, dtype=samples[0].dtype if samples[0].dtype != torch.bool
                   else torch.bool)
    for row, s in zip(x, samples):
        row[tuple(slice(0, n) for n in s.shape)] = s
    return x, sizes


def _sizes_from_padding(inp: Input, x: torch.Tensor) -> torch.Tensor:
    """Each sample's size along each variable axis of a padded tensor: up to its last value that is not `pad`
    (at least 1)."""
    sizes = []
    for a, want in enumerate(inp.shape):
        if want is None:
            axis = a + 1
            real = (x != inp.pad).flatten(1) if x.dim() == 2 else (x != inp.pad).movedim(axis, 1).flatten(2).any(2)
            last = torch.where(real.any(1), real.shape[1] - real.flip(1).int().argmax(1), torch.ones(len(x)))
            sizes.append(last.long().clamp(min=1))
    return torch.stack(sizes, 1)


def _as_dtype(inp: Input, x: torch.Tensor, where: str) -> torch.Tensor:
    if x.dtype.is_complex:
        raise DataError(f"{where} has {x.dtype} inputs; give real numbers")
    if inp.dtype == "float32":
        if x.dtype == torch.bool:
            raise DataError(f"{where} has {x.dtype} inputs; give real numbers")
        x = x.float()
        if not torch.isfinite(x).all():
            raise DataError(f"{where} has inputs that are NaN or infinite")
    elif inp.dtype == "int64":
        if x.is_floating_point() and not (torch.isfinite(x).all() and torch.equal(x, x.round())):
            raise DataError(f"{where} holds values that are not whole numbers; an int64 input takes integers")
        x = x.long()
    else:  # bool
        if x.dtype != torch.bool and not ((x == 0) | (x == 1)).all():
            raise DataError(f"{where} holds values that are not booleans (0/1)")
        x = x.bool()
    if inp.range is not None and x.numel() and inp.dtype != "bool":
        low, high = inp.range
        if x.min() < low or x.max() > high:
            bad = x[(x < low) | (x > high)][0].item()
            raise DataError(f"{where} holds {bad}, outside the input's range [{low:g}, {high:g}]")
    return x


def _features(task: Task, columns: dict[str, tuple[torch.Tensor, torch.Tensor | None]], what: str,
              cut: bool = True) -> Features:
    """The columns as Features in the task's input order, each dimension's sizes reconciled across the inputs
    that share it (padded, and with `cut` also cut, to the longest sample), and the padding masks made."""
    lengths: dict[str, torch.Tensor] = {}
    for inp in task.data_inputs:
        x, sizes = columns[inp.name]
        for k, name in enumerate(inp.dims):
            if name in lengths and not torch.equal(lengths[name], sizes[:, k]):
                row = int((lengths[name] != sizes[:, k]).nonzero()[0])
                raise DataError(f"{what}'s sample {row} has inputs of different sizes along dimension {name!r} "
                                f"({int(lengths[name][row])} and {int(sizes[row, k])}); inputs that share it "
                                f"must have the same size")
            lengths[name] = sizes[:, k]
    if lengths:  # pad every input of a dimension to the same longest size
        longest = {name: int(n.max()) for name, n in lengths.items()}
        if not cut:  # as wide as the widest input of the dimension, not its longest sample
            longest = {name: max(columns[i.name][0].shape[axis] for i in task.data_inputs
                                 for axis, d in i.axis_dims.items() if d == name) for name in longest}
        for inp in task.data_inputs:
            x, _ = columns[inp.name]
            for axis, name in inp.axis_dims.items():
                if x.shape[axis] < longest[name]:
                    x = _widen(x, axis, longest[name], inp.pad)
                elif x.shape[axis] > longest[name]:
                    x = x.narrow(axis, 0, longest[name])
            columns[inp.name] = (x, None)
    tensors = []
    for inp in task.inputs:
        if inp.padding_mask_of:
            tensors.append(padding_mask(columns[inp.padding_mask_of][0].shape, inp, lengths))
        else:
            tensors.append(columns[inp.name][0])
    return Features(tuple(tensors), tuple(i.axis_dims for i in task.inputs), lengths)


def padding_mask(shape, inp: Input, lengths: dict[str, torch.Tensor]) -> torch.Tensor:
    """True at every position beyond a sample's size along any of the input's variable axes."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for axis, name in inp.axis_dims.items():
        positions = torch.arange(shape[axis]).view(*[-1 if a == axis else 1 for a in range(len(shape))])
        mask |= positions >= lengths[name].view(-1, *[1] * (len(shape) - 1))
    return mask


def _targets(task: Task, y: torch.Tensor, what: str) -> torch.Tensor:
    out = task.output
    if task.regression:
        y = y.float().reshape(len(y), -1)
        if y.shape[1] != out.size:
            raise DataError(f"{what} has {y.shape[1]} target value(s) per sample; the task's output "
                            f"{out.name} has {out.size}")
        if not torch.isfinite(y).all():
            raise DataError(f"{what} has targets that are NaN or infinite")
        return y
    if y.is_floating_point() and not torch.equal(y, y.round()):
        raise DataError(f"{what} has labels that are not whole numbers; give class indices")
    y = y.reshape(-1).long() if y.dim() <= 1 or y.shape[1:].numel() == 1 else y
    if y.dim() != 1:
        raise DataError(f"{what} has labels of shape {list(y.shape[1:])} per sample; give one class index each")
    if y.min() < 0 or y.max() >= out.size:
        raise DataError(f"{what} has labels from {int(y.min())} to {int(y.max())}; the task has "
                        f"{out.size} classes (0 to {out.size - 1})")
    return y


def torch_dtype(inp: Input) -> torch.dtype:
    return TORCH_DTYPES[inp.dtype]
