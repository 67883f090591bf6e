"""An MLP for vector inputs: the product regressor (standardized X1, X2 -> standardized X1*X2), and any
task whose samples are feature vectors."""

from dataclasses import dataclass, field

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU, "leaky_relu": nn.LeakyReLU}


@dataclass
class ProductMLPConfig:
    hidden: list[int] = field(default_factory=lambda: [16, 8])
    """Hidden layer widths; [16, 8] is the reference architecture 2-16-8-1."""
    activation: str = "relu"
    """One of relu, gelu, tanh, silu, leaky_relu."""
    dropout: float = 0.0
    """Dropout after each hidden activation; 0 disables it."""

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if not self.hidden or any(w < 1 for w in self.hidden):
            raise ValueError(f"model.hidden must be a non-empty list of positive widths, got {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")


class ProductMLP(nn.Module):
    """in_features -> hidden widths -> out_features; the sizes come from the task."""

    def __init__(self, cfg: ProductMLPConfig, in_features: int, out_features: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[cfg.activation]()]
            if cfg.dropout > 0:
                layers.append(nn.Dropout(cfg.dropout))
            width = h
        layers.append(nn.Linear(width, out_features))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # (B, in_features) -> (B, out_features)
