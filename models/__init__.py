"""Networks, and the raw-units `Predictor` that wraps one with its task's normalization.

`models` defines networks only: no files, no training. Each network takes its input and output
sizes from the task (`t2d.Task`) that builds it. The checkpoint format lives in `models.checkpoint`
because it is the contract between `train` (writes it) and `export` (reads it), and both import `models`.
"""

from typing import Any

import torch
from torch import nn

from models.image import CNN, MLP, CNNConfig, MLPConfig
from models.normalize import Standardizer
from models.product import ProductMLP, ProductMLPConfig


class Predictor(nn.Module):
    """Raw units in, raw units out: standardize the float inputs, run the network, undo the target's
    standardization.

    Takes the task's inputs in order (one tensor each) and returns the network's outputs: one tensor, or a
    tuple in the task's output order, the target output in raw units. Training feeds `net` with data
    standardized once up front (`standardize`); export and serving call the whole `Predictor`, so the
    normalization is part of the traced graph. `input_norms` holds one Standardizer per float input, keyed by
    the input's position ("0", "1", ...); ids and masks pass through as they are.
    """

    def __init__(self, net: nn.Module, input_norms: dict[str, Standardizer], target_norm: Standardizer | None = None,
                 n_inputs: int = 1, target_index: int = 0):
        super().__init__()
        self.input_norms = nn.ModuleDict(input_norms)
        self.net = net
        self.target_norm = target_norm
        self.n_inputs, self.target_index = n_inputs, target_index

    def standardize(self, xs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(self.input_norms[str(i)](x) if str(i) in self.input_norms else x for i, x in enumerate(xs))

    def forward(self, *xs: torch.Tensor):
        out = self.net(*self.standardize(xs))
        if self.target_norm is None:
            return out
        if isinstance(out, torch.Tensor):
            return self.target_norm.inverse(out)
        out = list(out)
        out[self.target_index] = self.target_norm.inverse(out[self.target_index])
        return tuple(out)

    def scored(self, out):
        """The target output of `forward`'s (or the network's) answer."""
        return out if isinstance(out, torch.Tensor) else out[self.target_index]

    def norm_stats(self, task) -> dict:
        """The standardization statistics as plain lists, for people and for the contract."""
        norm = {"inputs": {i.name: self.input_norms[str(k)].to_dict() for k, i in enumerate(task.inputs)
                           if str(k) in self.input_norms and i.normalize != "none"}}
        if self.target_norm is not None:
            norm["target"] = self.target_norm.to_dict()
        return norm


def build_predictor(task, arch: str, config: dict[str, Any] | None = None) -> Predictor:
    """A freshly initialized Predictor (identity normalization) of `task`'s network `arch` with `config`.

    The standardizers' statistics have the task's shapes: per feature or one for all inputs
    (`Input.normalize`), one per regression target. ValueError for an unknown arch or config key."""
    net = task.build(arch, config)
    target = Standardizer((task.output.size,)) if task.regression else None
    norms = {str(k): Standardizer(i.stats_shape) for k, i in enumerate(task.inputs) if i.dtype == "float32"}
    index = [o.name for o in task.outputs].index(task.output.name)
    return Predictor(net, norms, target, len(task.inputs), index)


__all__ = ["Predictor", "Standardizer", "build_predictor", "ProductMLP", "ProductMLPConfig", "MLP", "MLPConfig",
           "CNN", "CNNConfig"]
