"""Image classifiers: the reference MLP (784-128-10 on 28x28 grey images) and a small CNN.

Both take their input shape (channels, height, width) and number of classes from the task."""

import math
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class MLPConfig:
    hidden: int = 128
    """Hidden width; 128 is the reference 784-128-10 network."""
    dropout: float = 0.0
    """Dropout after the hidden layer; 0 disables it (the reference has none)."""

    def __post_init__(self):
        if self.hidden < 1:
            raise ValueError("model.hidden must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig, in_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        self.fc1 = nn.Linear(math.prod(in_shape), cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.fc2 = nn.Linear(cfg.hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, 1, 28, 28) -> (B, 784)
        return self.fc2(self.drop(torch.relu(self.fc1(x))))  # -> (B, classes) logits


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


@dataclass
class CNNConfig:
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    """Output channels of the three 3x3 conv blocks; each block halves the image (28 -> 14 -> 7 -> 3)."""
    dropout: float = 0.2
    """Dropout before the classifier layer."""
    activation: str = "relu"
    """relu | gelu | silu, after every BatchNorm."""
    convs_per_block: list[int] = field(default_factory=lambda: [1, 1, 1])
    """3x3 conv + BatchNorm + activation layers in each of the three blocks; the block's first conv
    changes the width, the others keep it. Extra convs are cheapest in the later, smaller blocks."""
    pool_first: bool = False
    """Max-pool right after each block's first conv, before its BatchNorm and activation, instead of
    at the end of the block: with one conv per block the same shapes and parameters, with BatchNorm
    and the activation on 4x fewer values (on CPU the first block's BatchNorm, ReLU and pooling at
    28x28 were ~45% of a training step; this order cuts the step by ~15%, measured). A block's
    further convs then run at the pooled size: 1/4 of the cost of the same convs before the pool."""
    hidden: int = 0
    """Width of a hidden fully connected layer (+ activation and dropout) before the classifier;
    0 = none, the classifier reads the conv features directly."""

    def __post_init__(self):
        if len(self.channels) != 3 or any(c < 1 for c in self.channels):
            raise ValueError(f"model.channels must be three positive widths, got {self.channels}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if len(self.convs_per_block) != 3 or any(n < 1 for n in self.convs_per_block):
            raise ValueError(f"model.convs_per_block must be three counts >= 1, got {self.convs_per_block}")
        if self.hidden < 0:
            raise ValueError(f"model.hidden must be >= 0, got {self.hidden}")


def _conv_block(c_in: int, c_out: int, activation: str = "relu", convs: int = 1, pool_first: bool = False
                ) -> nn.Sequential:
    # No conv bias: BatchNorm's shift replaces it. The default (one conv, pooling last) is
    # Sequential(conv, bn, relu, pool): the state_dict keys of the original CNN.
    layers: list[nn.Module] = []
    for i in range(convs):
        layers.append(nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False))
        if pool_first and i == 0:
            layers.append(nn.MaxPool2d(2))
        layers += [nn.BatchNorm2d(c_out), ACTIVATIONS[activation]()]
    if not pool_first:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class CNN(nn.Module):
    """Three conv blocks and one linear layer (two with `hidden`): about 62K parameters with the defaults."""

    def __init__(self, cfg: CNNConfig, in_shape: tuple[int, ...], num_classes: int):
        super().__init__()
        channels, height, width = in_shape
        if min(height, width) < 8:
            raise ValueError(f"the CNN halves the image three times: it needs at least 8x8 pixels, got {height}x{width}")
        c1, c2, c3 = cfg.channels
        self.features = nn.Sequential(*(
            _conv_block(c_in, c_out, cfg.activation, n, cfg.pool_first)
            for c_in, c_out, n in zip((channels, c1, c2), cfg.channels, cfg.convs_per_block, strict=True)))
        flat = c3 * (height // 8) * (width // 8)  # three 2x2 poolings, each rounding down
        self.drop = nn.Dropout(cfg.dropout)
        # Identity (no parameters, no state_dict keys) unless a hidden layer is asked for.
        self.hidden = nn.Sequential(nn.Linear(flat, cfg.hidden), ACTIVATIONS[cfg.activation](),
                                    nn.Dropout(cfg.dropout)) if cfg.hidden else nn.Identity()
        self.fc = nn.Linear(cfg.hidden or flat, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, 1, 28, 28) -> (B, c3, 3, 3)
        return self.fc(self.hidden(self.drop(x.flatten(1))))  # -> (B, classes) logits
