"""torchvision's ResNet-18 (10 classes, random weights: nothing can be downloaded) at 3x224x224, as a task.

The model `bench/serving_images.py` serves: real-size images, so request bodies and model time are those
of the vision models people deploy. Its data are random pixels (64 training, 16 test images): it is timed,
not scored.

    PYTHONPATH=bench python -m train --task resnet_task:TASK --epochs 1
"""

from dataclasses import dataclass

import torch

from t2d import DataOptions, Input, Model, Output, Splits, Task

SIDE = 224


@dataclass
class ResNetConfig:
    """torchvision.models.resnet18 has no settings here: the architecture is the point."""


def data(opts: DataOptions) -> Splits:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(80, 3, SIDE, SIDE, generator=g)
    y = torch.randint(0, 10, (80,), generator=g)
    return Splits(train=(x[:64], y[:64]), test=(x[64:], y[64:]))


def resnet18(cfg: ResNetConfig, task: Task) -> torch.nn.Module:
    from torchvision.models import resnet18 as build

    return build(weights=None, num_classes=task.output.size)


TASK = Task(
    name="resnet18",
    kind="classification",
    input=Input("image", (3, SIDE, SIDE), range=(0.0, 1.0), normalize="global", description="RGB pixels in [0, 1]"),
    output=Output("logits", 10),
    classes=tuple(str(c) for c in range(10)),
    data=data,
    models={"resnet18": Model(ResNetConfig, resnet18)},
    defaults={"run": {"epochs": 1}, "data": {"batch_size": 16, "val_size": 16}},
)
