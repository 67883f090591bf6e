"""The product regression (Y = X1*X2) as the tutorials write it: the recipe this project is measured against.

    python bench/reference/product_reference.py [--seed 1]
    train_s=<s> test_mae=<raw units> test_mean_rel_err=<%> max_abs_err=<raw units>

1000 training points with X1, X2 uniform in [1, 10), z-scored inputs and target, an MLP 2-16-8-1 with
ReLU, MSE, Adam at lr 1e-3, batches of 100 shuffled every epoch, 1000 epochs; then errors in raw
units on a fresh 10,000-point test set (seed 123). The clock starts before the model is built, as the
reference's does. `bench/compare.py product` runs it beside `python -m train`.

It is the project's copy of `../shared/baselines/product_reference.py`, the script the targets in
BENCHMARKS.md were set against, written out line by line: same draws in the same order, so for the
same seed it prints the same errors (tests/test_reference.py checks this where that folder exists).
The only addition is `--seed` (default 1, the shared script's fixed seed).
"""

import argparse
import time

import torch
from torch import nn, optim

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--seed", type=int, default=1, help="torch's seed for the weights, data and shuffling (default: 1)")
args = parser.parse_args()
torch.manual_seed(args.seed)
t0 = time.perf_counter()


class SimpleNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 16)  # created in this order: it fixes which random draws each layer gets
        self.fc2 = nn.Linear(16, 8)
        self.fc3 = nn.Linear(8, 1)

    def forward(self, x):  # (B, 2) -> (B, 1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc(x)))))


model = SimpleNN()

# The training data, drawn after the weights from the same seeded generator.
X1 = 1 + 9 * torch.rand(1000)
X2 = 1 + 9 * torch.rand(1000)
Y = X1 * X2


def zscore(x):
    return (x - x.mean()) / x.std(), x.mean(), x.std()


X1n, m1, s1 = zscore(X1)
X2n, m2, s2 = zscore(X2)
Yn, my, sy = zscore(Y)
X = torch.stack([X1n, X2n], 1)  # (1000, 2)
Yc = Yn.unsqueeze(-1)  # (1000, 1)

criterion = nn.MSELoss()
optimizer = optim.Adam(model.parameters(), lr=1e-3)
for epoch in range(1000):
    idx = torch.randperm(1000)
    Xs, Ys = X[idx], Yc[idx]
    for i in range(10):  # 10 batches of 100
        bx, by = Xs[i * 100:(i + 1) * 100], Ys[i * 100:(i + 1) * 100]
        optimizer.zero_grad()
        loss = criterion(model(bx), by)
        loss.backward()
        optimizer.step()
train_s = time.perf_counter() - t0

# A fresh test set from its own generator, in raw units: the model's answer is un-standardized.
g = torch.Generator().manual_seed(123)
t1 = 1 + 9 * torch.rand(10000, generator=g)
t2 = 1 + 9 * torch.rand(10000, generator=g)
with torch.no_grad():
    pred = model(torch.stack([(t1 - m1) / s1, (t2 - m2) / s2], 1))[:, 0] * sy + my
true = t1 * t2
mae = (pred - true).abs().mean().item()
mre = ((pred - true).abs() / true).mean().item()
print(f"train_s={train_s:.2f} test_mae={mae:.4f} test_mean_rel_err={mre * 100:.3f}% "
      f"max_abs_err={(pred - true).abs().max().item():.3f}")
