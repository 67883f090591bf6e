"""A task's splits as checked tensors: what train, and export's quantization gate, feed their models."""

import numpy as np
import torch

from t2d.errors import DataError
from t2d.task import Task


def split_tensors(task: Task, split, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of one split as checked tensors: float32 inputs of the task's shape, and float32 targets
    (N, outputs) or int64 labels (N,) in range. DataError (one line) for anything else."""
    what = f"task {task.name}'s {name} split"
    if isinstance(split, (tuple, list)) and len(split) == 2:
        x, y = (torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for v in split)
    elif isinstance(split, torch.utils.data.Dataset) and hasattr(split, "__len__"):
        pairs = [split[i] for i in range(len(split))]
        if not pairs:
            raise DataError(f"{what} is empty")
        x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
        y = torch.stack([torch.as_tensor(p[1]) for p in pairs])
    else:
        raise DataError(f"{what} must be an (x, y) pair of tensors or a Dataset of (x, y), got {type(split).__name__}")
    if len(x) == 0 or len(x) != len(y):
        raise DataError(f"{what} has {len(x)} inputs and {len(y)} targets; it needs as many of each, at least one")
    if tuple(x.shape[1:]) != task.input.shape:
        raise DataError(f"{what} has inputs of shape {list(x.shape[1:])}; the task's input "
                        f"{task.input.name} is {list(task.input.shape)}")
    if x.dtype.is_complex or x.dtype == torch.bool:
        raise DataError(f"{what} has {x.dtype} inputs; give real numbers")
    x = x.float()
    if not torch.isfinite(x).all():
        raise DataError(f"{what} has inputs that are NaN or infinite")
    if task.regression:
        y = y.float().reshape(len(y), -1)
        if y.shape[1] != task.output.size:
            raise DataError(f"{what} has {y.shape[1]} target value(s) per sample; the task's output "
                            f"{task.output.name} has {task.output.size}")
        if not torch.isfinite(y).all():
            raise DataError(f"{what} has targets that are NaN or infinite")
    else:
        if y.is_floating_point() and not torch.equal(y, y.round()):
            raise DataError(f"{what} has labels that are not whole numbers; give class indices")
        y = y.reshape(-1).long() if y.dim() <= 1 or y.shape[1:].numel() == 1 else y
        if y.dim() != 1:
            raise DataError(f"{what} has labels of shape {list(y.shape[1:])} per sample; give one class index each")
        if y.min() < 0 or y.max() >= task.output.size:
            raise DataError(f"{what} has labels from {int(y.min())} to {int(y.max())}; the task has "
                            f"{task.output.size} classes (0 to {task.output.size - 1})")
    return x, y
