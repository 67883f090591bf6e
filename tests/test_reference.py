"""The project's own reference recipes (bench/reference/) are the scripts the targets were set against.

bench/compare.py runs them beside `python -m train`, so a clone measures without anything beside it. Where
`../shared/baselines/` exists (the scripts BENCHMARKS.md's targets were first measured with), ours and those
run with the same seed must print the same results: the same draws in the same order, the same numbers.
Only the clocks (`train_s`, `s_per_epoch`) may differ.
"""

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import REPO
import zygote

pytestmark = pytest.mark.slow

OURS = REPO / "bench" / "reference"
SHARED = REPO.parent / "shared" / "baselines"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"no {SHARED} beside this clone: nothing to compare with")
CLOCKS = re.compile(r"\b(train_s|s_per_epoch)=[\d.]+")


def run(script: Path, *args: str) -> str:
    """The run's last output line, with its clocks blanked out."""
    # One thread (torch sizes its MKL pool from it too): the same arithmetic in every run, whatever the machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = zygote.run([str(script), *args], REPO, env, 600)
    assert proc.returncode == 0, f"{' '.join(proc.args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return CLOCKS.sub(r"\1=<clock>", proc.stdout.strip().splitlines()[-1])


@needs_shared
def test_product_reference_prints_what_the_shared_one_does():
    # Side by side, with ours on another seed: the seed, ours' one addition, must reach the draws, or
    # "the same seed" would mean nothing.
    with ThreadPoolExecutor(3) as pool:
        runs = [pool.submit(run, OURS / "product_reference.py"), pool.submit(run, SHARED / "product_reference.py"),
                pool.submit(run, OURS / "product_reference.py", "--seed", "2")]
        ours, shared, other_seed = (job.result() for job in runs)
    assert re.fullmatch(r"train_s=<clock> test_mae=[\d.]+ test_mean_rel_err=[\d.]+% max_abs_err=[\d.]+", ours), ours
    assert ours == shared
    assert other_seed != ours


@needs_shared
@pytest.mark.skipif(shutil.which("dpkg") is None or subprocess.run(["dpkg", "-s", "dataset-fashion-mnist"],
                    capture_output=True).returncode != 0, reason="Debian's dataset-fashion-mnist is not installed "
                                                                    "(.ci/run installs it)")
def test_mnist_reference_prints_what_the_shared_one_does():
    # One epoch: the same draws decide it as for five. One after the other: the shared script unpacks the
    # IDX files where ours does, and not atomically, so a run beside it could read half a file.
    ours = run(OURS / "mnist_reference.py", "1")
    shared = run(SHARED / "mnist_reference.py", "1")
    assert re.fullmatch(r"epochs=1 train_s=<clock> s_per_epoch=<clock> test_acc=[\d.]+%", ours), ours
    assert ours == shared
