"""The image classifier as the tutorials write it: the recipe this project's MLP is measured against.

    python bench/reference/mnist_reference.py [EPOCHS] [--seed 0]     # EPOCHS default 5
    epochs=<n> train_s=<s> s_per_epoch=<s> test_acc=<%>

torchvision transforms (ToTensor, Normalize(0.5, 0.5)), a DataLoader of batch 64 shuffled each epoch,
an MLP 784-128-10, cross-entropy, Adam at lr 1e-3, on Fashion-MNIST as Debian's dataset-fashion-mnist
package installs it (`apt-get install dataset-fashion-mnist`). The clock covers the epoch loop alone,
from after the optimizer exists. `bench/compare.py fashion-mnist` runs it beside `python -m train`.

It is the project's copy of `../shared/baselines/mnist_reference.py`, written out line by line: same
draws in the same order, so for the same seed it prints the same accuracy (tests/test_reference.py
checks this where that folder exists). The additions: `--seed` (default 0, the shared script's), and the
IDX files are unpacked atomically, so two runs at once never read a half-written file.
"""

import argparse
import gzip
import os
import shutil
import subprocess
import tempfile
import time

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("epochs", type=int, nargs="?", default=5, help="training epochs (default: 5)")
parser.add_argument("--seed", type=int, default=0, help="torch's seed for the shuffling and the weights (default: 0)")
args = parser.parse_args()

# torchvision reads the un-gzipped IDX files from <root>/FashionMNIST/raw: unpack Debian's copy there once.
files = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True, check=True).stdout.split()
src = os.path.dirname(next(f for f in files if f.endswith("train-images-idx3-ubyte.gz")))
root = os.path.join(tempfile.gettempdir(), "reference-fashion-mnist")
raw = os.path.join(root, "FashionMNIST", "raw")
os.makedirs(raw, exist_ok=True)
for f in os.listdir(src):
    out = os.path.join(raw, f[:-3])
    if f.endswith(".gz") and not os.path.exists(out):
        with gzip.open(os.path.join(src, f)) as a, open(f"{out}.{os.getpid()}.tmp", "wb") as b:
            shutil.copyfileobj(a, b)
        os.replace(b.name, out)  # whole or absent: a second run starting meanwhile never reads half a file

torch.manual_seed(args.seed)
transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
train = datasets.FashionMNIST(root, train=True, download=True, transform=transform)
test = datasets.FashionMNIST(root, train=False, download=True, transform=transform)
train_loader = DataLoader(train, batch_size=64, shuffle=True)
test_loader = DataLoader(test, batch_size=64)


class SimpleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 128)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):  # (B, 1, 28, 28) -> (B, 10)
        return self.fc2(self.relu(self.fc1(x.view(-1, 784))))


model = SimpleNet()
criterion = nn.CrossEntropyLoss()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

t0 = time.perf_counter()
for epoch in range(args.epochs):
    model.train()
    for x, y in train_loader:
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
train_s = time.perf_counter() - t0

model.eval()
correct = total = 0
with torch.no_grad():
    for x, y in test_loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += y.numel()
print(f"epochs={args.epochs} train_s={train_s:.1f} s_per_epoch={train_s / args.epochs:.2f} "
      f"test_acc={100 * correct / total:.2f}%")
