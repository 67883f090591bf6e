"""Your own task, as a user writes it: scikit-learn's diabetes data (442 patients, 10 features ->
disease progression one year later), a small MLP, no edit to the toolkit.

    python -m train --task examples.diabetes:TASK --out runs/diabetes
    python -m export --task examples.diabetes:TASK --checkpoint runs/diabetes/best.pt
    bentoml serve     # then POST /v2/models/diabetes/infer

The data ship with scikit-learn (no download). Features arrive already centred and scaled by
scikit-learn; the toolkit standardizes them again from the training split anyway, and the target
too, and puts both inside the exported graph, so clients send and get raw units.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from t2d import DataOptions, Input, Model, Output, Splits, Task

FEATURES = ("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")


def data(opts: DataOptions) -> Splits:
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32).unsqueeze(1)
    # A fixed test split (seed 0, 20%): the same patients are held out whatever the run's seed.
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    test, rest = perm[:88], perm[88:]
    return Splits(train=(x[rest], y[rest]), test=(x[test], y[test]))  # val: held out of train by the trainer


@dataclass
class MLPConfig:
    hidden: list[int] = field(default_factory=lambda: [16])
    """Hidden layer widths."""
    dropout: float = 0.1


def build(cfg: MLPConfig, task: Task) -> nn.Module:
    layers, width = [], task.input.shape[0]
    for h in cfg.hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(cfg.dropout)]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, task.output.size))  # (B, 10) -> (B, 1)


TASK = Task(
    name="diabetes",
    kind="regression",
    input=Input("features", (10,), description="age, sex, bmi, bp, s1..s6 as scikit-learn scales them"),
    output=Output("progression", 1, description="disease progression one year after baseline"),
    data=data,
    models={"mlp": Model(MLPConfig, build)},
    # Chosen on the validation split: 442 patients overfit fast, so early stopping ends the run.
    defaults={"run": {"epochs": 500, "threads": 1}, "data": {"batch_size": 32, "val_size": 60}, "stop": {"patience": 30},
              "optim": {"lr": 1e-3, "weight_decay": 1e-4}, "log": {"print_every": 20}},
    description="scikit-learn's diabetes regression",
)
