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
    """Raw units in, raw units out: standardize the input, run the network, undo the target's standardization.

    Training feeds `net` with data standardized once up front; export and serving call the
    whole `Predictor`, so the normalization is part of the traced graph.
    """

    def __init__(self, net: nn.Module, input_norm: Standardizer, target_norm: Standardizer | None = None):
        super().__init__()
        self.input_norm = input_norm
        self.net = net
        self.target_norm = target_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.net(self.input_norm(x))
        return z if self.target_norm is None else self.target_norm.inverse(z)


def build_predictor(task, arch: str, config: dict[str, Any] | None = None) -> Predictor:
    """A freshly initialized Predictor (identity normalization) of `task`'s network `arch` with `config`.

    The standardizers' statistics have the task's shapes: per feature or one for all inputs
    (`Input.normalize`), one per regression target. ValueError for an unknown arch or config key."""
    net = task.build(arch, config)
    target = Standardizer((task.output.size,)) if task.regression else None
    return Predictor(net, Standardizer(task.input.stats_shape), target)


__all__ = ["Predictor", "Standardizer", "build_predictor", "ProductMLP", "ProductMLPConfig", "MLP", "MLPConfig",
           "CNN", "CNNConfig"]
