"""The I/O contract of an exported model: raw units in, raw units out.

product:     x [batch, 2] float32, raw X1, X2     -> y [batch, 1] float32, the denormalized X1*X2
classifiers: image [batch, 1, 28, 28] float32 in [0, 1] -> logits [batch, n_classes] float32

Training sees image pixels in 0..255 (its raw units); the exported graph takes [0, 1], the
convention of image tooling, and scales by `pixel_scale` inside the graph. HTTP clients send
0..255 and the service divides by `pixel_scale`.
"""

from typing import Any

import torch
from torch import nn

from models import Predictor, input_shape, is_regression
from models.checkpoint import CheckpointError
from models.product import INPUT_RANGE

PIXEL_SCALE = 255.0


class RawUnits(nn.Module):
    """The module that is traced: the trained Predictor behind the contract's input scaling."""

    def __init__(self, predictor: Predictor, input_scale: float = 1.0):
        super().__init__()
        self.predictor = predictor
        self.input_scale = input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(x * self.input_scale if self.input_scale != 1.0 else x)


def contract_of(ckpt: dict[str, Any], predictor: Predictor) -> dict[str, Any]:
    """The contract for a loaded checkpoint and the predictor rebuilt from it, as plain JSON-able values.

    Shapes and normalization come from the architecture and the weights, which the checkpoint's
    loading has validated; of the checkpoint's descriptive fields only `classes` is used, and checked.
    """
    task, arch = ckpt["task"], ckpt["arch"]
    shape = list(input_shape(arch))
    norm = {"input": predictor.input_norm.to_dict()}
    if predictor.target_norm is not None:
        norm["target"] = predictor.target_norm.to_dict()
    if is_regression(arch):
        return {
            "task": task, "kind": "regression",
            "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", *shape],
                        "description": "raw X1, X2"}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 1],
                         "description": "predicted X1*X2 in raw units"}],
            "classes": None,
            "train_range": [list(INPUT_RANGE), list(INPUT_RANGE)],  # [low, high) per input
            "pixel_scale": None,
            "normalization": norm,
        }
    with torch.no_grad():
        outputs = predictor(torch.zeros(1, *shape)).shape[1]
    classes = ckpt.get("classes")
    if not (isinstance(classes, list) and len(classes) == outputs and all(isinstance(c, str) for c in classes)):
        raise CheckpointError(f"checkpoint's classes must be a list of {outputs} names, got {str(classes)[:80]}")
    return {
        "task": task, "kind": "classification",
        "inputs": [{"name": "image", "dtype": "float32", "shape": ["batch", *shape],
                    "description": "grayscale pixels in [0, 1]"}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", len(classes)],
                     "description": "unnormalized class scores; softmax gives probabilities"}],
        "classes": classes,
        "train_range": None,
        "pixel_scale": PIXEL_SCALE,  # HTTP pixels 0..255 / pixel_scale = the model's input
        "normalization": norm,  # statistics in training's units (pixels 0..255)
    }


def traced_module(predictor: Predictor, contract: dict[str, Any]) -> RawUnits:
    return RawUnits(predictor, contract["pixel_scale"] or 1.0).eval()
