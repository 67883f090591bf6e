"""A real-size image model as a user declares it: torchvision's ResNet-18 (no pretrained weights: none can be
downloaded) on RGB images of 3x224x224 in [0, 1], 10 classes (imported by tests/test_resnet.py and named on the
command line as resnet_task:RESNET).

The data are 40 synthetic images, enough for a couple of training steps: which of ten colours tints the image.
"""

from dataclasses import dataclass

import torch
import torchvision

from t2d import Input, Model, Output, Splits, Task

SIZE = 224
CLASSES = 10


def tinted(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    colours = torch.rand(CLASSES, 3, 1, 1, generator=torch.Generator().manual_seed(7))
    noise = torch.rand(n, 3, SIZE, SIZE, generator=g)
    return (0.5 * noise + 0.5 * colours[labels]).clamp(0, 1), labels  # (n, 3, 224, 224) in [0, 1], (n,)


def data(opts) -> Splits:
    g = torch.Generator().manual_seed(0)
    return Splits(train=tinted(32, g), test=tinted(8, g))


@dataclass
class ResNetConfig:
    pass  # torchvision's ResNet-18 as it is


RESNET = Task(
    name="resnet18", kind="classification",
    input=Input("image", (3, SIZE, SIZE), range=(0.0, 1.0), description="RGB pixels in [0, 1]"),
    output=Output("logits", CLASSES), classes=tuple(f"tint{i}" for i in range(CLASSES)), data=data,
    models={"resnet18": Model(ResNetConfig, lambda cfg, task: torchvision.models.resnet18(num_classes=CLASSES,
                                                                                           weights=None))},
    # lr 1e-2 sends the logits to millions in two steps, and every softmax to one class.
    defaults={"run": {"epochs": 1}, "data": {"batch_size": 16, "val_size": 8}, "optim": {"lr": 1e-4}})
