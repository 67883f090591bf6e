"""The fast product paths: L-BFGS, checkpoints written at most every N seconds, run.threads, and the
configs/product_fast.yaml and configs/product_best.yaml files."""

from pathlib import Path

import pytest
import torch
from conftest import PRODUCT, REPO, assert_same_weights, history, state, train

from models.checkpoint import load_checkpoint
from train import fit as fit_module
from train.config import ConfigError
from train.main import main, parse_args

# Full batch: the 256 tiny training points in one batch, as L-BFGS wants them.
LBFGS = [*PRODUCT, "--data.batch_size", "256", "--optim.name", "lbfgs", "--optim.lr", "1", "--optim.max_iter", "5"]


def test_lbfgs_fits_the_product_full_batch(tmp_path):
    summary = train([*LBFGS, "--epochs", "3"], tmp_path)
    h = history(tmp_path)
    assert h[-1]["val_loss"] < 0.1 * h[0]["val_loss"]
    assert summary["test"]["mre"] < 20  # measured 8.1%; Adam (lr 1e-3, batch 100) is at 91% after its 3 epochs
    opt_state = torch.load(tmp_path / "last.pt", weights_only=True)["resume"]["optimizer"]["state"]
    (s,) = opt_state.values()  # L-BFGS keeps its state under the first parameter
    # at most max_iter a step, one step an epoch (measured: 12 iterations, 18 evaluations)
    assert 3 < s["n_iter"] <= 15 and s["func_evals"] >= s["n_iter"]


def test_lbfgs_resume_equals_one_run(tmp_path):
    train([*LBFGS, "--epochs", "4"], tmp_path / "straight")
    train([*LBFGS, "--epochs", "2"], tmp_path / "resumed")
    train(["--resume", str(tmp_path / "resumed" / "last.pt"), "--epochs", "4"], tmp_path / "resumed")
    for name in ("last.pt", "best.pt"):
        assert_same_weights(state(tmp_path / "straight" / name), state(tmp_path / "resumed" / name))


@pytest.mark.parametrize("argv, expected", [
    (["--optim.weight_decay", "1e-4"], "optim.weight_decay does not apply to optim.name lbfgs"),
    (["--optim.clip_grad_norm", "1"], "optim.clip_grad_norm does not apply to optim.name lbfgs"),
    (["--precision", "fp16"], "lbfgs cannot run with run.precision fp16"),
    (["--optim.max_iter", "0"], "optim.max_iter must be >= 1"),
])
def test_lbfgs_refuses_what_it_cannot_do(argv, expected):
    with pytest.raises(ConfigError, match=expected):
        parse_args([*LBFGS, *argv])


def count_writes(monkeypatch) -> list[str]:
    """The file names train.fit writes checkpoints to, in order."""
    names = []
    real = fit_module.save_checkpoint

    def counted(data, path):
        names.append(Path(path).name)
        real(data, path)

    monkeypatch.setattr(fit_module, "save_checkpoint", counted)
    return names


def test_checkpoint_every_s_0_writes_every_epoch(tmp_path, monkeypatch):
    names = count_writes(monkeypatch)
    train([*PRODUCT, "--epochs", "4", "--optim.lr", "0.01", "--log.checkpoint_every_s", "0"], tmp_path)
    losses = [r["val_loss"] for r in history(tmp_path)]
    improvements = sum(loss < min(losses[:i], default=float("inf")) for i, loss in enumerate(losses))
    assert names.count("last.pt") == 4 and names.count("best.pt") == improvements


def test_checkpoints_wait_for_the_end_of_a_short_run(tmp_path, monkeypatch):
    # min_delta this large: epoch 1 stays the best, so best.pt (epoch 1) and last.pt (epoch 3) differ.
    names = count_writes(monkeypatch)
    train([*PRODUCT, "--epochs", "3", "--stop.min_delta", "1e9", "--log.checkpoint_every_s", "1e9"], tmp_path)
    assert sorted(names) == ["best.pt", "last.pt"]  # once each, at the end
    best, last = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / "last.pt")
    assert best["epoch"] == 1 and last["epoch"] == 3
    assert best["metrics"]["loss"] == history(tmp_path)[0]["val_loss"]
    # epoch 1's own copy of the weights, not the live ones of epoch 3
    assert not torch.equal(best["state_dict"]["net.layers.0.weight"], last["state_dict"]["net.layers.0.weight"])
    assert best["resume"]["stopper"]["best_epoch"] == 1


def test_interrupt_saves_the_last_finished_epoch(tmp_path, monkeypatch, capsys):
    """Ctrl-C in epoch 3 of a run that had written nothing yet: last.pt is epoch 2, as its message says."""
    calls = []
    real = fit_module.evaluate

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_module, "evaluate", interrupted)
    rc = main(["--device", "cpu", "--log.tensorboard", "false", "--log.plots", "false", "--out", str(tmp_path),
               *PRODUCT, "--epochs", "5", "--log.checkpoint_every_s", "1e9"])
    assert rc == 130 and "last.pt holds the last finished epoch" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] in (1, 2)


def test_threads_sets_torch_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        train([*PRODUCT, "--epochs", "1", "--run.threads", "2"], tmp_path)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["product_fast.yaml", "product_best.yaml"])
def test_product_configs_run(tmp_path, name):
    """The configs as shipped, cut to 2 epochs on the tiny data set (the full runs take seconds, not ms)."""
    cfg, _ = parse_args(["--config", str(REPO / "configs" / name)])
    assert cfg.optim.name == "lbfgs" and cfg.data.batch_size == cfg.data.size == 1000
    summary = train(["--config", str(REPO / "configs" / name), *PRODUCT, "--data.batch_size", "256",
                     "--epochs", "2"], tmp_path)
    assert summary["epochs_run"] == 2 and summary["test"]["mre"] < 50
