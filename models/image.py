"""Image classifiers for 28x28 grey images (MNIST, Fashion-MNIST): the reference MLP and a small CNN."""

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class MLPConfig:
    hidden: int = 128
    """Hidden width; 128 is the reference 784-128-10 network."""
    num_classes: int = 10
    dropout: float = 0.0
    """Dropout after the hidden layer; 0 disables it (the reference has none)."""

    def __post_init__(self):
        if self.hidden < 1 or self.num_classes < 2:
            raise ValueError("model.hidden must be >= 1 and model.num_classes >= 2")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.fc2 = nn.Linear(cfg.hidden, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, 1, 28, 28) -> (B, 784)
        return self.fc2(self.drop(torch.relu(self.fc1(x))))  # -> (B, 10) logits


@dataclass
class CNNConfig:
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    """Output channels of the three 3x3 conv blocks; each block halves the image (28 -> 14 -> 7 -> 3)."""
    num_classes: int = 10
    dropout: float = 0.2
    """Dropout before the classifier layer."""

    def __post_init__(self):
        if len(self.channels) != 3 or any(c < 1 for c in self.channels):
            raise ValueError(f"model.channels must be three positive widths, got {self.channels}")
        if self.num_classes < 2:
            raise ValueError("model.num_classes must be >= 2")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    # No conv bias: BatchNorm's shift replaces it.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)
    )


class CNN(nn.Module):
    """Three conv blocks and one linear layer: about 62K parameters with the default widths."""

    def __init__(self, cfg: CNNConfig):
        super().__init__()
        c1, c2, c3 = cfg.channels
        self.features = nn.Sequential(_conv_block(1, c1), _conv_block(c1, c2), _conv_block(c2, c3))
        self.drop = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(c3 * 3 * 3, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, 1, 28, 28) -> (B, c3, 3, 3)
        return self.fc(self.drop(x.flatten(1)))  # -> (B, 10) logits
