"""Choose the Fashion-MNIST CNN's settings on the validation split, then score the choice on the test set.

    python bench/select_cnn.py tune [--seeds 0 1] [--only NAME ...]   # validation only: run.test false
    python bench/select_cnn.py final NAME [--seeds 10 11 12 13 14]     # the test set, once per seed

`tune` trains each candidate below on the tuning seeds with `--run.test false`, so no model sees the
test split, and prints each run's validation accuracy (5,000 images held out of the 60,000 training
images; the split is drawn by the seed) and training seconds. `final` trains one candidate as its
config file ships it (with that file's own validation split) on seeds that tuning did not use, scores
each on the 10,000 test images once, and prints mean ± std of test accuracy and training seconds.
Every run is `python -m train` as a child process, one at a time, with all cores (2 threads here),
and its run folder is kept under --out.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from t2d.cpu import describe  # noqa: E402

BASE = ["--config", "configs/fashion_mnist_cnn.yaml"]
TUNE_SPLIT = ["--data.val_size", "5000"]  # every tuning run; a final run keeps its config's own split

# name: overrides on top of the shipped config ("shipped"); a candidate's own --config replaces the
# base file (train reads the last one).
CANDIDATES = {
    "shipped": [],
    "e11": ["--run.epochs", "11"],
    "skip0.55-e12": ["--data.skip_easiest", "0.55", "--run.epochs", "12"],
    "skip0.4-e9": ["--data.skip_easiest", "0.4", "--run.epochs", "9"],
    "lr5e-3": ["--optim.lr", "0.005"],
    "lr1.2e-2": ["--optim.lr", "0.012"],
    "wd0.05": ["--optim.weight_decay", "0.05"],
    "smooth0": ["--optim.label_smoothing", "0"],
    "dropout0.1": ["--model.dropout", "0.1"],
    "batch256-e12": ["--data.batch_size", "256", "--optim.lr", "0.012", "--run.epochs", "12"],
    # For 120 s on an AVX2-only CPU, where the shipped recipe takes ~150 s: fewer epochs, or batches of 256
    # (a step of 256 images cost ~0.8x two steps of 128 there, bench/train_step.py --batch).
    "e8": ["--run.epochs", "8"],
    "batch256-e10": ["--data.batch_size", "256", "--optim.lr", "0.012"],
    # A moving average of the weights (optim.ema) as the model, over about the last 500 or 200 of the ~1,900 steps.
    "e8-ema0.998": ["--run.epochs", "8", "--optim.ema", "0.998"],
    "e8-ema0.995": ["--run.epochs", "8", "--optim.ema", "0.995"],
    # No weight decay on BatchNorm's scales and shifts and the linear layers' biases (optim.decay_norms_and_biases).
    "e8-nodecay": ["--run.epochs", "8", "--optim.decay_norms_and_biases", "false"],
    # A cheaper first block (16 channels: ~23% fewer multiply-adds an image), so that 10 epochs fit 120 s on AVX2.
    "c16-e10": ["--model.channels", "[16, 48, 96]"],
    "c16-e10-nodecay": ["--model.channels", "[16, 48, 96]", "--optim.decay_norms_and_biases", "false"],
    # The shipped recipe in a time budget (run.max_seconds): as many of its 10 epochs as this machine fits in 115 s,
    # timing included, the schedule planned for them.
    "budget115": ["--run.max_seconds", "115"],
    # bf16 autocast: only on a CPU with native bf16 instructions (train refuses it elsewhere).
    "bf16": ["--config", "configs/fashion_mnist_cnn_bf16.yaml"],
    "bf16-e11": ["--config", "configs/fashion_mnist_cnn_bf16.yaml", "--run.epochs", "11"],
    "bf16-e13": ["--config", "configs/fashion_mnist_cnn_bf16.yaml", "--run.epochs", "13"],
}


def train(name: str, seed: int, test: bool, out: Path, extra: list[str]) -> dict:
    run_dir = out / f"{name}-seed{seed}"
    cmd = [sys.executable, "-m", "train", *BASE, *CANDIDATES[name], *([] if test else TUNE_SPLIT),
           "--run.seed", str(seed), "--run.test", str(test).lower(), "--log.tensorboard", "false",
           "--out", str(run_dir), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    s = json.loads((run_dir / "summary.json").read_text())
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val_by_epoch = [round(h["val_accuracy"], 2) for h in history]
    row = {"name": name, "seed": seed, "train_s": s["train_seconds"], "epochs": s["epochs_run"],
           "val_acc": round(s["val"]["accuracy"], 2), "val_by_epoch": val_by_epoch}
    if test:
        row["test_acc"] = round(s["test"]["accuracy"], 2)
    print(json.dumps(row), flush=True)
    return row


def mean_std(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["tune", "final"])
    p.add_argument("name", nargs="?", help="final: the candidate picked on validation")
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--only", nargs="+", choices=list(CANDIDATES), help="tune: these candidates only")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "select_cnn")
    p.add_argument("--train-args", nargs=argparse.REMAINDER, default=[],
                   help="last: more python -m train arguments for every run (the suite's short mode: tiny data)")
    args = p.parse_args()
    print(f"CPU: {describe()}; {os.cpu_count()} cores; base: {' '.join(BASE)}", flush=True)
    if args.mode == "tune":
        seeds = args.seeds or [0, 1]
        for name in args.only or CANDIDATES:
            rows = [train(name, seed, False, args.out, args.train_args) for seed in seeds]
            print(f"== {name}: val accuracy {mean_std([r['val_acc'] for r in rows])}%, "
                  f"train {mean_std([r['train_s'] for r in rows])} s", flush=True)
    else:
        if args.name not in CANDIDATES:
            sys.exit(f"error: final needs a candidate name, one of {', '.join(CANDIDATES)}")
        rows = [train(args.name, seed, True, args.out, args.train_args) for seed in args.seeds or [10, 11, 12, 13, 14]]
        print(f"== {args.name} on seeds {[r['seed'] for r in rows]}: test accuracy "
              f"{mean_std([r['test_acc'] for r in rows])}% (min {min(r['test_acc'] for r in rows)}), "
              f"train {mean_std([r['train_s'] for r in rows])} s (max {max(r['train_s'] for r in rows)})", flush=True)


if __name__ == "__main__":
    main()
