"""Time one CNN training step in each memory format and with torch.compile, on this CPU.

    python bench/train_step.py [--threads 2] [--steps 40] [--batch 128] [--compile]

The network is the shipped Fashion-MNIST recipe's (configs/fashion_mnist_cnn.yaml: models.CNN at
[24, 48, 96], AdamW, batch 128) on 1x28x28 images, and the same network on 3x32x32 images, where the
batch's own layout matters too (with one channel NCHW and NHWC are the same bytes). Each variant is a
plain training step (forward, cross-entropy, backward, AdamW) on random data; the reference is that
step as a user's loop writes it, the model and batches in torch's default (contiguous) layout. Prints
the median of `--steps` timed steps after 5 warm-up steps, each variant's ratio to the reference, and
the CPU. `--compile` adds torch.compile's warm-up (its first step) and step time.

Run it on an otherwise idle machine: every variant runs in this one process, one after the other.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.image import CNN, CNNConfig  # noqa: E402
from t2d.cpu import describe  # noqa: E402

RECIPE = CNNConfig(channels=[24, 48, 96], pool_first=True, convs_per_block=[2, 1, 1], hidden=512, dropout=0.2)


def step_time(shape: tuple[int, ...], layout: str, steps: int, compiled: bool = False, batch: int = 128
              ) -> tuple[float, float]:
    """(median seconds a step, seconds of the first step) for `layout`: contiguous | model (the network's
    weights channels_last, batches as they come) | both (weights and batches channels_last)."""
    torch.manual_seed(0)
    net = CNN(RECIPE, shape, 10)
    if layout != "contiguous":
        net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=8e-3, weight_decay=0.1)
    run = torch.compile(net) if compiled else net
    x, y = torch.randn(batch, *shape), torch.randint(0, 10, (batch,))
    if layout == "both":
        x = x.contiguous(memory_format=torch.channels_last)
    net.train()
    times = []
    for _ in range(steps + 5):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(run(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[5:]), times[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=128, help="images a step (default: 128, the recipe's)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (tens of seconds to warm up)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {describe()}; torch {torch.__version__}; {args.threads} threads; batch {args.batch}; "
          f"median of {args.steps}")
    for shape in ((1, 28, 28), (3, 32, 32)):
        ref, _ = step_time(shape, "contiguous", args.steps, batch=args.batch)
        rows = [("contiguous (reference)", ref, None)]
        for layout in ("model", "both"):
            rows.append((f"channels_last: {layout}", step_time(shape, layout, args.steps, batch=args.batch)[0], None))
        if args.compile:
            t, first = step_time(shape, "both", args.steps, compiled=True, batch=args.batch)
            rows.append(("channels_last: both + torch.compile", t, first))
        print(f"\n{'x'.join(map(str, shape))} images")
        for name, t, first in rows:
            warm = f"  (first step {first:.1f} s)" if first is not None else ""
            print(f"  {name:38s} {t * 1000:7.1f} ms a step  {ref / t:5.2f}x the reference's speed{warm}")


if __name__ == "__main__":
    main()
