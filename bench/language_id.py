"""examples/language_id.py's Transformer beside a character n-gram naive Bayes, on the same words and split.

    python bench/language_id.py select             # validation only: the baseline's grid and our candidates
    python bench/language_id.py final --seeds 1 2 3 --transformer "--run.epochs 10"   # the test split, once each

select: naive Bayes (scikit-learn's MultinomialNB on CountVectorizer character n-grams within word boundaries,
n from 1 up to 1..5, smoothing alpha in a grid) fitted on the training split and scored on validation; and each
Transformer candidate (`--candidate "OVERRIDES"`, repeatable; default: the example's settings and a few around
them) trained by `python -m train` with run.test false, so no model sees the test split while choosing.
final: the chosen baseline (--ngrams, --alpha) and the chosen Transformer (--transformer OVERRIDES) on the test
split, the Transformer once per fresh seed; accuracy as mean +- std and each one's seconds (the baseline's fit,
the Transformer's train_seconds), with the CPU they ran on.
"""

import argparse
import json
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


def transformer(overrides: str, seed: int, test: bool, size: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "train", "--task", "examples.language_id:TASK", "--out", out, "--seed", str(seed),
               "--data.size", str(size), "--log.tensorboard", "false", "--log.plots", "false",
               "--run.test", "true" if test else "false", *overrides.split()]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"training failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
        return json.loads((Path(out) / "summary.json").read_text())


def select(a) -> None:
    splits = words(a.size)
    print(f"{len(splits['train'][0])} training, {len(splits['val'][0])} validation words; {describe()}")
    for n in range(1, 6):
        for alpha in ALPHAS:
            accuracy, seconds = naive_bayes(splits, n, alpha, "val")
            print(f"naive Bayes  ngrams 1-{n} alpha {alpha:<5}  val accuracy {accuracy:6.2f}%  {seconds:6.1f} s")
    for candidate in a.candidate or CANDIDATES:
        s = transformer(candidate, a.seed, False, a.size)
        print(f"transformer  {candidate or '(the example as it ships)':<45} val accuracy "
              f"{s['val']['accuracy']:6.2f}%  {s['train_seconds']:6.1f} s  (seed {a.seed})")


def final(a) -> None:
    splits = words(a.size)
    print(f"{len(splits['train'][0])} training, {len(splits['test'][0])} test words; {describe()}")
    accuracy, seconds = naive_bayes(splits, a.ngrams, a.alpha, "test")
    print(f"naive Bayes  ngrams 1-{a.ngrams} alpha {a.alpha}: test accuracy {accuracy:.2f}% in {seconds:.1f} s "
          f"(deterministic: one run)", flush=True)
    acc, sec = [], []
    for seed in a.seeds:  # each seed's line as it finishes: a seed trains for a quarter of an hour on 2 cores
        r = transformer(a.transformer, seed, True, a.size)
        acc.append(r["test"]["accuracy"])
        sec.append(r["train_seconds"])
        print(f"transformer  seed {seed}: test accuracy {acc[-1]:.2f}% in {sec[-1]:.1f} s", flush=True)
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)
    print(f"transformer  {a.transformer or '(as it ships)'}: test accuracy {statistics.fmean(acc):.2f} +- "
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
    a = p.parse_args()
    (select if a.step == "select" else final)(a)


if __name__ == "__main__":
    main()
