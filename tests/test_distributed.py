"""Training at scale on CPU: real `torchrun` jobs (2 processes, gloo) against one-process runs.

    python -m pytest tests/test_distributed.py -q        # about a minute on 2 CPU cores

What is checked: a 2-process run ends where the 1-process run ends (REL_TOL), only rank 0 writes,
checkpoints move between 1 and 2 processes both ways, k-fold under torchrun, a NaN stops the run
without touching best.pt or last.pt, an error on one rank ends the job instead of hanging it, and
CPU refuses half precision. One-process runs train in this process (`train.main.main`); every
2-process run is `python -m torch.distributed.run --standalone --nproc_per_node=2 -m train`, its launcher and
workers forked from tests/zygote.py but for the test of a rank's error.
"""

import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zygote

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import t2d  # noqa: E402
from models.checkpoint import load_checkpoint, predictor_from_checkpoint  # noqa: E402
from train.data import batch_order  # noqa: E402
from train.main import main  # noqa: E402

# How far a 2-process run may end from the 1-process run with the same global batch and seed, as a
# relative difference of each validation metric. Both see the same samples in every step; what
# differs is float32 rounding: DDP averages two 50-sample mean gradients instead of taking one
# 100-sample mean, and the sharded validation pass runs batches of another shape. Measured on
# this suite's configs: product (Adam), 6e-9 on validation metrics after 4 epochs (training loss
# 6e-8), 7e-8 after 20; image MLP (SGD), 1.5e-7 after 3. Bugs planted on purpose moved them by
# 2e-4 to 1 within these epochs: no gradient sync between processes (both tests), gradients
# summed instead of averaged (the SGD test only: Adam does not see a gradient's scale).
REL_TOL = 1e-6

# Tiny product data: 400 training points = 4 global batches of 100 (2 x 50 under torchrun).
PRODUCT = ["--task", "product", "--device", "cpu", "--data.size", "400", "--data.val_size", "100",
           "--data.test_size", "500", "--data.batch_size", "100", "--log.plots", "false"]
EPOCHS = 4
TIMEOUT = 180  # s per subprocess: a hung collective fails the test instead of the whole suite


def env() -> dict:
    # One thread per process: the 1- and 2-process runs use the same kernels, and the 2 workers
    # don't fight over 2 cores (torchrun would set this itself, with a warning).
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def torchrun(args: list[str], cwd: Path, timeout: float = TIMEOUT, fork_workers: bool = True
             ) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 -m train ARGS` (standalone: a free local port)."""
    # The launcher forks from the zygote, and so do the two workers it starts (`--no-python` and a small stand-in
    # process for each, which torchrun watches and signals as it would the worker: see zygote.worker), unless the
    # test is about how the workers' processes end.
    run_env = env()
    workers = zygote.torchrun_workers(run_env) if fork_workers else None
    launch = ["--no-python", *workers] if workers else []
    return zygote.run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *launch, "-m", "train",
                       *args], cwd, run_env, timeout)


def train_here(args: list[str]) -> int:
    """`python -m train ARGS` in this process, single-threaded like each torchrun worker; the exit code."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(args)
    finally:
        torch.set_num_threads(threads)


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def assert_close_metrics(a: dict, b: dict, keys) -> None:
    for k in keys:
        assert rel(a[k], b[k]) <= REL_TOL, f"{k}: {a[k]} vs {b[k]} (relative {rel(a[k], b[k]):.2e} > {REL_TOL})"


def files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out).parent if p.parent.name == "tensorboard" else p.relative_to(out))
                  for p in out.rglob("*") if p.is_file())


def snapshot(out: Path, names=("best.pt", "last.pt", "metrics.jsonl")) -> dict:
    """Bytes and modification time of each file: proof that a failed run left them alone."""
    return {n: ((out / n).read_bytes(), (out / n).stat().st_mtime_ns) for n in names}


def own_traceback(stderr: str) -> bool:
    """A traceback through this project's code (torchrun prints its own when a worker fails)."""
    return any(f'File "{REPO / pkg}' in stderr for pkg in ("train", "models"))


def write_idx(path: Path, array: np.ndarray) -> None:
    path.write_bytes(bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """A 1-process product run: 4 epochs, TensorBoard on."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert train_here([*PRODUCT, "--epochs", str(EPOCHS), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The same run as `single` under torchrun with 2 processes."""
    out = tmp_path_factory.mktemp("dist") / "run"
    proc = torchrun([*PRODUCT, "--epochs", str(EPOCHS), "--out", str(out)], cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_batch_order_shards_each_global_batch():
    """Step i of a 2-process job sees exactly the samples of step i of the 1-process run."""
    one = batch_order(400, 100, epoch=3, seed=0)
    ranks = [batch_order(400, 100, epoch=3, seed=0, rank=r, world_size=2) for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 4
    for i, batch in enumerate(one):
        assert sorted(batch.tolist()) == sorted(ranks[0][i].tolist() + ranks[1][i].tolist())
    assert not torch.equal(torch.cat(one), torch.cat(batch_order(400, 100, epoch=4, seed=0)))  # set_epoch


@pytest.mark.slow
def test_two_processes_match_one(single, dist):
    out, proc = dist
    assert "processes: 2" in proc.stdout
    s1, s2 = summary(single), summary(out)
    assert (s1["processes"], s2["processes"]) == (1, 2)
    assert s1["precision"] == s2["precision"] == "fp32"  # CPU trains in fp32
    assert s1["epochs_run"] == s2["epochs_run"] == EPOCHS and s1["best_epoch"] == s2["best_epoch"]
    assert_close_metrics(s1["val"], s2["val"], ("loss", "mse", "mae", "mre"))
    assert_close_metrics(s1["test"], s2["test"], ("loss", "mse", "mae", "mre"))
    for a, b in zip(history(single), history(out), strict=True):  # every epoch, not only the last
        assert_close_metrics(a, b, ("train_loss", "val_loss", "val_mre"))
    # The weights themselves: the same up to float32 rounding.
    w1, w2 = (load_checkpoint(d / "best.pt")["state_dict"] for d in (single, out))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_processes_skip_the_same_easiest_examples_as_one(tmp_path):
    """data.skip_easiest: each process records the losses of its own shard; they are all-reduced, so
    every process picks the same hardest examples, and the job trains as one process does."""
    args = [*PRODUCT, "--epochs", str(EPOCHS), "--data.skip_easiest", "0.5"]
    assert train_here([*args, "--out", str(tmp_path / "one")]) == 0
    proc = torchrun([*args, "--out", str(tmp_path / "two")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for a, b in zip(history(tmp_path / "one"), history(tmp_path / "two"), strict=True):
        assert_close_metrics(a, b, ("train_loss", "val_loss", "val_mre"))
    l1, l2 = (load_checkpoint(tmp_path / d / "last.pt")["resume"]["hard_examples"]["last"] for d in ("one", "two"))
    assert l1.shape == l2.shape == (400,)
    assert torch.allclose(l1, l2, rtol=1e-5, atol=1e-9)


@pytest.mark.slow
def test_only_rank_0_writes(single, dist):
    out, proc = dist
    assert files(out) == files(single)  # the same files as one process: nothing per rank, no temp files
    assert [r["epoch"] for r in history(out)] == list(range(1, EPOCHS + 1))  # one line per epoch, once
    assert len(list((out / "tensorboard").iterdir())) == 1  # one event file
    assert proc.stdout.count("done: ") == 1 and proc.stdout.count("config:") == 1


@pytest.mark.slow
def test_distributed_checkpoint_loads_in_one_process(single, dist):
    out, _ = dist
    ckpt = load_checkpoint(out / "best.pt")
    assert not any(k.startswith("module.") or ".module." in k for k in ckpt["state_dict"])
    x = torch.tensor([[2.0, 3.0], [7.5, 9.0]])
    with torch.no_grad():
        product = t2d.builtin_tasks()["product"]
        pred = predictor_from_checkpoint(ckpt, product)(x)
        ref = predictor_from_checkpoint(load_checkpoint(single / "best.pt"), product)(x)
    torch.testing.assert_close(pred, ref, rtol=REL_TOL, atol=0)


@pytest.mark.slow
def test_checkpoints_resume_across_process_counts(single, dist, tmp_path):
    """1-process last.pt continues under torchrun; torchrun's last.pt continues in one process."""
    a, b = tmp_path / "from_single", tmp_path / "from_dist"
    shutil.copytree(single, a)
    shutil.copytree(dist[0], b)
    more = ["--epochs", str(EPOCHS + 2), "--log.plots", "false"]
    proc = torchrun(["--resume", str(a / "last.pt"), "--out", str(a), *more], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train_here(["--resume", str(b / "last.pt"), "--out", str(b), *more]) == 0
    for out, procs in ((a, 2), (b, 1)):
        assert [r["epoch"] for r in history(out)] == list(range(1, EPOCHS + 3))
        s = summary(out)
        assert (s["epochs_run"], s["processes"]) == (EPOCHS + 2, procs)
        assert load_checkpoint(out / "last.pt")["epoch"] == EPOCHS + 2
    # 4 epochs in 1 process + 2 in 2, or 2 + 1: both are the same 6 epochs.
    assert_close_metrics(history(a)[-1], history(b)[-1], ("train_loss", "val_loss", "val_mre"))


@pytest.mark.slow
def test_kfold_under_torchrun(tmp_path):
    """3 folds; each stops early at epoch 2 (no later epoch can beat epoch 1 by min_delta 1e9),
    a decision every rank must take together or the job hangs."""
    out = tmp_path / "kfold"
    args = [*PRODUCT, "--folds", "3", "--epochs", "5", "--stop.patience", "1", "--stop.min_delta", "1e9",
            "--log.tensorboard", "false", "--out", str(out)]
    proc = torchrun(args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folds = summary(out)["folds"]
    assert folds["k"] == 3 and len(folds["values"]) == 3
    assert folds["mean"] == pytest.approx(statistics.fmean(folds["values"]), rel=1e-12)
    assert folds["std"] == pytest.approx(statistics.stdev(folds["values"]), rel=1e-12)
    assert folds["best_fold"] == 1 + folds["values"].index(min(folds["values"]))  # monitor: loss
    for i, value in enumerate(folds["values"], 1):
        fold = out / f"fold{i}"
        assert [r["epoch"] for r in history(fold)] == [1, 2]  # stopped early, one line per epoch
        best = load_checkpoint(fold / "best.pt")
        assert best["epoch"] == 1 and best["metrics"]["loss"] == value
    kept, best_fold = load_checkpoint(out / "best.pt"), load_checkpoint(out / f"fold{folds['best_fold']}" / "best.pt")
    assert kept["epoch"] == best_fold["epoch"] and kept["metrics"] == best_fold["metrics"]
    for k, v in best_fold["state_dict"].items():
        assert torch.equal(kept["state_dict"][k], v), k
    s = summary(out)
    assert (s["stopped"], s["epochs_run"], s["best_epoch"], s["processes"]) == ("early_stopping", 2, 1, 2)
    assert proc.stdout.count("3-fold val_loss") == 1


# Epochs 1-2 train at lr 1e-3; then the step schedule multiplies the rate by 1e30 and epoch 3 blows up.
BLOW_UP = [*PRODUCT, "--epochs", "4", "--sched.name", "step", "--sched.step_size", "2", "--sched.gamma", "1e30",
           "--log.tensorboard", "false"]


@pytest.fixture(scope="module")
def blown(tmp_path_factory) -> tuple[Path, int]:
    """A run that stopped on NaN/inf in epoch 3; its last.pt (epoch 2) resumes straight into lr 1e27."""
    out = tmp_path_factory.mktemp("blown") / "run"
    return out, train_here([*BLOW_UP, "--out", str(out)])


def test_nan_mid_run_saves_only_finite_epochs(blown):
    out, rc = blown
    assert rc == 1
    assert [r["epoch"] for r in history(out)] == [1, 2]
    assert load_checkpoint(out / "last.pt")["epoch"] == 2  # the NaN epoch was never saved
    best = load_checkpoint(out / "best.pt")
    assert best["epoch"] == 2 and all(torch.isfinite(v).all() for v in best["state_dict"].values())


def test_nan_stops_run_and_keeps_checkpoints(blown, tmp_path, capsys):
    """The resumed epoch 3 is inf/NaN: exit 1, one line, and best.pt, last.pt untouched."""
    out = tmp_path / "run"
    shutil.copytree(blown[0], out)
    before = snapshot(out)
    capsys.readouterr()
    rc = train_here(["--resume", str(out / "last.pt"), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and ("nan" in lines[0] or "inf" in lines[0]), err
    assert "Traceback" not in err
    assert snapshot(out) == before  # best.pt, last.pt and metrics.jsonl: byte for byte, not even rewritten


@pytest.mark.slow
def test_nan_under_torchrun(blown, tmp_path):
    """Both ranks see the same reduced NaN loss and stop; one message, checkpoints untouched."""
    out = tmp_path / "run"
    shutil.copytree(blown[0], out)
    before = snapshot(out)
    proc = torchrun(["--resume", str(out / "last.pt"), "--out", str(out)], cwd=tmp_path)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(ours) == 1 and "loss became" in ours[0], proc.stderr[-3000:]
    assert not own_traceback(proc.stderr), proc.stderr[-3000:]
    assert snapshot(out) == before


def test_resume_refuses_new_optimizer_settings(single, tmp_path, capsys):
    """The saved optimizer state would silently keep the old lr: a one-line error instead."""
    capsys.readouterr()
    rc = train_here(["--resume", str(single / "last.pt"), "--out", str(tmp_path / "run"),
                     "--epochs", str(EPOCHS + 1), "--optim.lr", "1e30"])
    assert rc == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: optim.lr was 0.001 in the checkpoint; --resume continues its model, optimizer and schedule: "
        "start a new run to change it"]


@pytest.mark.slow
def test_error_on_one_rank_ends_the_job(tmp_path):
    """The run folder's config.yaml is a folder: rank 0 fails to write it while rank 1 goes on into
    training and waits for rank 0 in DDP's first collective. torchrun must end the job, not hang.
    (A --out that is a file no longer gets this far: both ranks refuse it while parsing.)"""
    out = tmp_path / "run"
    (out / "config.yaml").mkdir(parents=True)
    # Real worker processes: how fast torchrun sees rank 0 end, and stops rank 1 before it reports the lost peer
    # itself, is what is under test; a stand-in's extra hop changes that race.
    proc = torchrun([*PRODUCT, "--epochs", "2", "--out", str(out)], cwd=tmp_path, timeout=120, fork_workers=False)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert ours and "Is a directory" in ours[0], proc.stderr[-3000:]
    assert not own_traceback(proc.stderr), proc.stderr[-3000:]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_on_cpu_is_a_one_line_error(precision, tmp_path, capsys):
    capsys.readouterr()
    rc = train_here([*PRODUCT, "--precision", precision, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines() == [f"error: run.precision {precision} needs CUDA; the cpu path trains in fp32"]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_image_task_two_processes_match_one(tmp_path):
    """MNIST-format IDX files (300 training, 100 test images), the MLP, 3 epochs, batch 50 (2 x 25).
    SGD, unlike Adam, moves with the gradient's scale: a sum over ranks instead of a mean shows here."""
    data = tmp_path / "idx"
    data.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 300), ("t10k", 100)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):  # the class is the row of a bright bar
            images[i, 2 * c + 2:2 * c + 6, 4:24] = 220
        write_idx(data / f"{prefix}-images-idx3-ubyte", images)
        write_idx(data / f"{prefix}-labels-idx1-ubyte", labels)
    args = ["--task", "mnist", "--device", "cpu", "--data-dir", str(data), "--data.download", "false",
            "--model.arch", "mlp", "--epochs", "3", "--data.val_size", "100", "--data.batch_size", "50",
            "--optim.name", "sgd", "--optim.lr", "0.01", "--log.tensorboard", "false", "--log.plots", "false"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert train_here([*args, "--out", str(one)]) == 0
    proc = torchrun([*args, "--out", str(two)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for a, b in zip(history(one), history(two), strict=True):
        assert_close_metrics(a, b, ("train_loss", "val_loss"))
        assert a["val_accuracy"] == b["val_accuracy"]  # the same confusion counts, reduced exactly
    s1, s2 = summary(one), summary(two)
    assert s2["processes"] == 2 and s1["test"]["per_class"] == s2["test"]["per_class"]
    assert_close_metrics(s1["test"], s2["test"], ("loss",))
