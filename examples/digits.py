"""Your own image classifier: scikit-learn's handwritten digits (1,797 images of 8x8 pixels, 10 classes),
trained with the toolkit's own CNN. No edit to the toolkit.

    python -m train --task examples.digits:TASK --out runs/digits
    python -m export --task examples.digits:TASK --checkpoint runs/digits/best.pt
    bentoml serve     # then POST /v2/models/digits/infer with an "image" of shape [n, 1, 8, 8]

The data ship with scikit-learn (no download). Pixels arrive as 0..16; the task serves them as
[0, 1] (Input.range), so the server refuses anything outside that.
"""

import torch

from models import CNN, CNNConfig, MLP, MLPConfig
from t2d import DataOptions, Input, Model, Output, Splits, Task


def data(opts: DataOptions) -> Splits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    y = torch.tensor(digits.target, dtype=torch.int64)
    # A fixed test split (seed 0, 360 images): the same images whatever the run's seed.
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    test, rest = perm[:360], perm[360:]
    return Splits(train=(x[rest], y[rest]), test=(x[test], y[test]))  # val: held out of train by the trainer


TASK = Task(
    name="digits",
    kind="classification",
    input=Input("image", (1, 8, 8), range=(0.0, 1.0), normalize="global", description="8x8 grey pixels in [0, 1]"),
    output=Output("logits", 10, description="one score per digit; softmax gives probabilities"),
    classes=tuple(str(d) for d in range(10)),
    data=data,
    # The toolkit's networks, sized by this task: any nn.Module builder works the same way.
    models={"cnn": Model(CNNConfig, lambda cfg, task: CNN(cfg, task.input.shape, task.output.size)),
            "mlp": Model(MLPConfig, lambda cfg, task: MLP(cfg, task.input.shape, task.output.size))},
    defaults={"run": {"epochs": 30}, "data": {"batch_size": 64, "val_size": 200},
              "model": {"channels": [16, 32, 64]}, "optim": {"lr": 3e-3}, "log": {"print_every": 5}},
    description="scikit-learn's 8x8 handwritten digits",
)
