"""Z-score standardization as a module, so its statistics travel inside `state_dict`."""

import torch
from torch import nn


class Standardizer(nn.Module):
    """`(x - mean) / std` with mean and std as buffers (saved, never trained).

    `shape` is the shape of one statistic: `(2,)` for the product inputs, `(1,)` for the
    target or for a whole image (one mean and std over all pixels).
    """

    def __init__(self, shape: tuple[int, ...] = (1,)):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))

    @torch.no_grad()
    def fit(self, x: torch.Tensor, dims: tuple[int, ...] = (0,)) -> "Standardizer":
        """Set mean and std from `x`, reducing over `dims` (the training split only)."""
        x = x.double()  # a float32 sum over 60,000 images loses digits
        self.mean.copy_(x.mean(dim=dims).reshape(self.mean.shape))
        # Unbiased std, as the reference script's `x.std()`; a constant feature gets std 1.
        std = x.std(dim=dims).reshape(self.std.shape)
        self.std.copy_(torch.where(std > 0, std, torch.ones_like(std)))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std + self.mean

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}
