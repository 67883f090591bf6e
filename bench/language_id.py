"""examples/language_id.py's Transformer beside a character n-gram naive Bayes, on the same words and split.

    python bench/language_id.py select             # validation only: the baseline's grid and our candidates
    python bench/language_id.py final --seeds 1 2 3 --transformer "--run.epochs 10"   # the test split, once each
    python bench/language_id.py final --seeds 1 2 3 --members 3 --jobs 2   # ensembles of 3 runs, 2 runs at a time

select: naive Bayes (scikit-learn's MultinomialNB on CountVectorizer character n-grams within word boundaries,
n from 1 up to 1..5, smoothing alpha in a grid) fitted on the training split and scored on validation; and each
Transformer candidate (`--candidate "OVERRIDES"`, repeatable; default: the example's settings and a few around
them) trained by `python -m train` with run.test false, so no model sees the test split while choosing.
final: the chosen baseline (--ngrams, --alpha) and the chosen Transformer (--transformer OVERRIDES) on the test
split, the Transformer once per fresh seed; accuracy as mean +- std and each one's seconds (the baseline's fit,
the Transformer's train_seconds), with the CPU they ran on.
--members N: each Transformer is an ensemble (`models.ensemble`, what `python -m export --checkpoint A B ...`
exports) of N runs with seeds S, S+100, ...; it scores the members and the ensemble, and its seconds are the
members' sum. --jobs J trains J runs at a time with cores/J threads each (their seconds are then not one run's alone).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.language_id import TASK  # noqa: E402
from t2d import DataOptions  # noqa: E402
from t2d.cpu import describe  # noqa: E402

CANDIDATES = ["", "--run.epochs 6", "--run.epochs 14", "--model.width 96 --model.feedforward 192",
              "--optim.lr 0.004"]
ALPHAS = (0.01, 0.03, 0.1, 0.3, 1.0)


def words(size: int):
    splits = TASK.data(DataOptions(size=size))
    return {name: (part[0]["ids"], part[1].tolist()) for name, part in
            (("train", splits.train), ("val", splits.val), ("test", splits.test))}


def naive_bayes(splits, ngrams: int, alpha: float, on: str) -> tuple[float, float]:
    """Accuracy (%) on split `on` and seconds to fit and predict."""
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.naive_bayes import MultinomialNB
    from sklearn.pipeline import make_pipeline

    t0 = time.perf_counter()
    model = make_pipeline(CountVectorizer(analyzer="char_wb", ngram_range=(1, ngrams)), MultinomialNB(alpha=alpha))
    model.fit(*splits["train"])
    predicted = model.predict(splits[on][0])
    seconds = time.perf_counter() - t0
    truth = splits[on][1]
    return 100 * sum(int(p == t) for p, t in zip(predicted, truth)) / len(truth), seconds


def train_runs(overrides: str, seeds: list[int], test: bool, a) -> list[tuple[dict, Path]]:
    """`python -m train` once per seed, --jobs at a time; each run's summary.json and folder (under a.keep)."""
    threads = ["--run.threads", str(max(1, (os.cpu_count() or 1) // a.jobs))] if a.jobs > 1 else []
    procs = []
    for seed in seeds:
        out = Path(tempfile.mkdtemp(prefix=f"seed{seed}-", dir=a.keep))
        cmd = [sys.executable, "-m", "train", "--task", "examples.language_id:TASK", "--out", str(out), "--seed",
               str(seed), "--data.size", str(a.size), "--log.tensorboard", "false", "--log.plots", "false",
               "--run.test", "true" if test else "false", *threads, *overrides.split()]
        procs.append((cmd, out, subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                                 text=True)))
        while sum(p.poll() is None for *_, p in procs) >= a.jobs:
            time.sleep(1)
    runs = []
    for cmd, out, proc in procs:
        _, err = proc.communicate()
        if proc.returncode:
            sys.exit(f"training failed: {' '.join(cmd)}\n{err[-2000:]}")
        runs.append((json.loads((out / "summary.json").read_text()), out))
    return runs


def ensemble_accuracy(folders: list[Path], split: str, size: int) -> float:
    """Accuracy (%) on `split` of the ensemble of the runs' best.pt: the module `python -m export` exports."""
    import torch

    from models.checkpoint import load_checkpoint, predictor_from_checkpoint
    from models.ensemble import Ensemble
    from train.config import build_config
    from train.data import load_task_data
    from train.engine import evaluate
    from train.runtime import Runtime

    members = [predictor_from_checkpoint(load_checkpoint(f / "best.pt", task=TASK), TASK) for f in folders]
    cfg = build_config("examples.language_id:TASK", [{"data": {"size": size}, "run": {"test": split == "test"}}])
    data = load_task_data(cfg, torch.device("cpu"))
    x, y = (data.test_x, data.test_y) if split == "test" else (data.val_x, data.val_y)
    rt = Runtime(torch.device("cpu"), "fp32")
    return evaluate(Ensemble(members, True), x, y, False, 1024, rt, len(TASK.classes))["accuracy"]


def transformers(overrides: str, seeds: list[int], test: bool, a) -> list[tuple[float, float, str]]:
    """Per seed: (accuracy %, training seconds, what it was), of one run or of an ensemble of --members runs."""
    split = "test" if test else "val"
    # Every seed's first member, then every seed's second, ...: their folders stay under --keep, so a bench cut
    # short still holds whole smaller ensembles of every seed.
    member_seeds = [seed + 100 * k for k in range(a.members) for seed in seeds]
    runs = dict(zip(member_seeds, train_runs(overrides, member_seeds, test, a)))
    found = []
    for seed in seeds:
        group = [runs[seed + 100 * k] for k in range(a.members)]
        scores = [r[split]["accuracy"] for r, _ in group]
        seconds = sum(r["train_seconds"] for r, _ in group)
        if a.members == 1:
            found.append((scores[0], seconds, f"seed {seed}"))
            continue
        folders = [folder for _, folder in group]
        accuracy = ensemble_accuracy(folders, split, a.size)
        smaller = "".join(f", the first {k}: {ensemble_accuracy(folders[:k], split, a.size):.2f}%"
                          for k in range(2, a.members))  # what fewer members would have scored
        found.append((accuracy, seconds, f"seed {seed}: ensemble of seeds "
                      f"{', '.join(str(seed + 100 * k) for k in range(a.members))} (members "
                      f"{', '.join(f'{v:.2f}%' for v in scores)}{smaller})"))
    return found


def select(a) -> None:
    splits = words(a.size)
    print(f"{len(splits['train'][0])} training, {len(splits['val'][0])} validation words; {describe()}")
    for n in range(1, 6):
        for alpha in ALPHAS:
            accuracy, seconds = naive_bayes(splits, n, alpha, "val")
            print(f"naive Bayes  ngrams 1-{n} alpha {alpha:<5}  val accuracy {accuracy:6.2f}%  {seconds:6.1f} s")
    for candidate in a.candidate or CANDIDATES:
        for accuracy, seconds, what in transformers(candidate, [a.seed], False, a):
            print(f"transformer  {candidate or '(the example as it ships)':<45} val accuracy "
                  f"{accuracy:6.2f}%  {seconds:6.1f} s  ({what})")


def final(a) -> None:
    splits = words(a.size)
    print(f"{len(splits['train'][0])} training, {len(splits['test'][0])} test words; {describe()}")
    accuracy, seconds = naive_bayes(splits, a.ngrams, a.alpha, "test")
    print(f"naive Bayes  ngrams 1-{a.ngrams} alpha {a.alpha}: test accuracy {accuracy:.2f}% in {seconds:.1f} s "
          f"(deterministic: one run)", flush=True)
    acc, sec = [], []
    for accuracy, seconds, what in transformers(a.transformer, a.seeds, True, a):  # every seed's runs in one queue
        acc.append(accuracy)
        sec.append(seconds)
        print(f"transformer  {what}: test accuracy {accuracy:.2f}% in {seconds:.1f} s", flush=True)
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    many = f", ensembles of {a.members}" if a.members > 1 else ""
    print(f"transformer  {a.transformer or '(as it ships)'}{many}: test accuracy {statistics.fmean(acc):.2f} +- "
          f"{sd(acc):.2f}% in {statistics.fmean(sec):.1f} +- {sd(sec):.1f} s over seeds {a.seeds}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("step", choices=["select", "final"])
    p.add_argument("--size", type=int, default=20000, help="words per language (default: 20000)")
    p.add_argument("--seed", type=int, default=0, help="select: the Transformer candidates' seed (default: 0)")
    p.add_argument("--candidate", action="append", help="select: a Transformer candidate's train overrides")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="final: fresh seeds (default: 1 2 3)")
    p.add_argument("--ngrams", type=int, default=5, help="final: the baseline's largest n (default: 5)")
    p.add_argument("--alpha", type=float, default=0.1, help="final: the baseline's smoothing (default: 0.1)")
    p.add_argument("--transformer", default="", help="final: the chosen train overrides (default: none)")
    p.add_argument("--members", type=int, default=1, help="runs per Transformer, an ensemble when > 1 (default: 1)")
    p.add_argument("--jobs", type=int, default=1, help="training runs at a time (default: 1)")
    p.add_argument("--keep", help="keep the runs' folders under this folder (default: a temporary one, removed)")
    a = p.parse_args()
    if a.members < 1 or a.jobs < 1:
        p.error("--members and --jobs must be at least 1")
    with tempfile.TemporaryDirectory(prefix="language_id-") as tmp:
        a.keep = a.keep or tmp
        Path(a.keep).mkdir(parents=True, exist_ok=True)
        (select if a.step == "select" else final)(a)


if __name__ == "__main__":
    main()
