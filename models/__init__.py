"""Networks for the built-in tasks, and the raw-units `Predictor` that wraps them.

`models` defines networks only: no files, no training. The checkpoint format lives in
`models.checkpoint` because it is the contract between `train` (writes it) and `export`
(reads it), and both import `models`.
"""

from dataclasses import fields
from typing import Any

import torch
from torch import nn

from models.image import CNN, MLP, CNNConfig, MLPConfig
from models.normalize import Standardizer
from models.product import ProductMLP, ProductMLPConfig

# name -> (config dataclass, network class, shape of one raw input sample, regression?)
ARCHITECTURES: dict[str, tuple[type, type, tuple[int, ...], bool]] = {
    "product_mlp": (ProductMLPConfig, ProductMLP, (2,), True),
    "mlp": (MLPConfig, MLP, (1, 28, 28), False),
    "cnn": (CNNConfig, CNN, (1, 28, 28), False),
}


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


def model_config(arch: str, values: dict[str, Any] | None = None):
    """The architecture's config dataclass, filled from `values` (unknown keys are an error)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown model architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    cls = ARCHITECTURES[arch][0]
    values = dict(values or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown model.{unknown[0]} for architecture {arch!r}; known: {sorted(known)}")
    return cls(**values)


def build_predictor(arch: str, config: dict[str, Any] | None = None) -> Predictor:
    """A freshly initialized Predictor (identity normalization) for `arch` with `config`."""
    cfg = model_config(arch, config)
    _, net_cls, shape, regression = ARCHITECTURES[arch]
    input_norm = Standardizer(shape[:1] if len(shape) == 1 else (1,))  # per feature, or one for all pixels
    return Predictor(net_cls(cfg), input_norm, Standardizer((1,)) if regression else None)


def input_shape(arch: str) -> tuple[int, ...]:
    """Shape of one raw input sample, without the batch axis."""
    return ARCHITECTURES[arch][2]


def is_regression(arch: str) -> bool:
    return ARCHITECTURES[arch][3]


__all__ = [
    "ARCHITECTURES", "Predictor", "Standardizer", "build_predictor", "model_config", "input_shape",
    "is_regression", "ProductMLP", "ProductMLPConfig", "MLP", "MLPConfig", "CNN", "CNNConfig",
]
