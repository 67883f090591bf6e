"""The product task: regress Y = X1*X2 from X1, X2 uniform in [1, 10), as the reference script does.

Training and validation points come from one draw seeded by the run's seed, split by position; the
test set is drawn exactly as the reference draws it (10,000 points, seed 123), so test errors
compare one to one.
"""

import torch

from models.product import ProductMLP, ProductMLPConfig
from t2d.task import DataOptions, Input, Model, Output, Splits, Task

# X1 and X2 are drawn uniform in [LOW, HIGH); a prediction outside this square is an extrapolation.
INPUT_RANGE = (1.0, 10.0)
PARITY_SEED = 20261123  # export's parity inputs are fresh: neither the training seeds nor the test seed 123


def points(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n points as the reference draws them: all X1, then all X2, uniform in [1, 10)."""
    low, high = INPUT_RANGE
    x1 = low + (high - low) * torch.rand(n, generator=generator)
    x2 = low + (high - low) * torch.rand(n, generator=generator)
    return torch.stack([x1, x2], 1), (x1 * x2).unsqueeze(1)  # (n, 2), (n, 1)


def data(opts: DataOptions) -> Splits:
    x, y = points(opts.size + opts.val_size, torch.Generator().manual_seed(opts.seed))
    test = points(opts.test_size, torch.Generator().manual_seed(opts.test_seed))
    return Splits(train=(x[:opts.size], y[:opts.size]), val=(x[opts.size:], y[opts.size:]), test=test)


def parity_inputs(n: int, generator: torch.Generator) -> torch.Tensor:
    """Fresh points over the whole training square (more than the test set's draw covers at batch 1024)."""
    return points(n, generator)[0]


def build(cfg: ProductMLPConfig, task: Task) -> ProductMLP:
    return ProductMLP(cfg, task.input.shape[0], task.output.size)


TASK = Task(
    name="product",
    kind="regression",
    input=Input("x", (2,), train_range=(INPUT_RANGE, INPUT_RANGE), description="raw X1, X2"),
    output=Output("y", 1, description="predicted X1*X2 in raw units"),
    data=data,
    models={"product_mlp": Model(ProductMLPConfig, build)},
    # One thread for the tiny MLP: with torch's default 2 threads on 2 busy cores, the default run
    # took 500 s instead of ~8 s (measured from a fresh clone while another training ran).
    defaults={"run": {"epochs": 1000, "threads": 1}, "data": {"batch_size": 100}, "log": {"print_every": 50}},
    parity_inputs=parity_inputs,
    description="Y = X1*X2 for X1, X2 in [1, 10)",
)
