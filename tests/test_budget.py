"""run.max_seconds: real training steps timed, the epochs planned to fit, and a run that `--epochs N` repeats."""

import json

import yaml
from conftest import FAST, PRODUCT, assert_same_weights, history, one_error_line, state, train

from train.main import main

BUDGET = 3.0  # seconds: thousands of the tiny product set's epochs on any machine, never the 100,000 asked for
ONE_CYCLE = ["--sched.name", "onecycle", "--optim.lr", "0.01", "--epochs", "100000"]


def test_a_budget_plans_the_epochs_that_fit_and_the_run_repeats_without_it(tmp_path, capsys):
    s = train([*PRODUCT, *ONE_CYCLE, "--run.max_seconds", str(BUDGET)], tmp_path / "budget")
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("run.max_seconds"))
    planned = s["budget"]["epochs"]
    assert 1 <= planned < 100000 and f"{planned} epochs fit" in line
    assert s["epochs_run"] == planned and len(history(tmp_path / "budget")) == planned
    assert s["budget"]["max_seconds"] == BUDGET and s["budget"]["timing_seconds"] < BUDGET
    # The schedule was planned for those epochs: one-cycle has annealed by the last one.
    assert history(tmp_path / "budget")[-1]["lr"] < 0.01 * 0.01
    # config.yaml describes the run as it went: its epochs and no budget, so it repeats (and resumes) exactly.
    run_cfg = yaml.safe_load((tmp_path / "budget" / "config.yaml").read_text())["run"]
    assert run_cfg["epochs"] == planned and run_cfg["max_seconds"] == 0.0
    again = train([*PRODUCT, *ONE_CYCLE, "--epochs", str(planned)], tmp_path / "again")
    assert "budget" not in again and again["epochs_run"] == planned
    assert_same_weights(state(tmp_path / "budget" / "best.pt"), state(tmp_path / "again" / "best.pt"))


def test_a_budget_too_small_for_one_epoch_is_a_one_line_error_and_no_run_folder(tmp_path, capsys):
    out = tmp_path / "run"
    capsys.readouterr()
    assert main([*FAST, *PRODUCT, "--run.max_seconds", "0.000001", "--out", str(out)]) == 2
    assert "not even one epoch fits on this machine" in one_error_line(capsys.readouterr().err)
    assert not out.exists()


def test_a_budget_refuses_what_it_cannot_plan(tmp_path, capsys):
    train([*PRODUCT, "--epochs", "2"], tmp_path / "done")
    for args, message in (
            (["--folds", "3"], "run.max_seconds plans one model's epochs, not k folds'"),
            (["--run.compile", "true"], "run.max_seconds times eager steps"),
            (["--resume", str(tmp_path / "done" / "last.pt"), "--epochs", "4"],
             "--resume continues the checkpoint's 2 planned epochs; run.max_seconds plans a new run")):
        capsys.readouterr()
        assert main([*FAST, *PRODUCT, "--run.max_seconds", "10", "--out", str(tmp_path / "run"), *args]) == 2
        assert message in one_error_line(capsys.readouterr().err)
    assert json.loads((tmp_path / "done" / "summary.json").read_text())["epochs_run"] == 2
