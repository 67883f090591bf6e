"""Every shipped config in configs/ parses and trains: a typo in a YAML file, or a field the code no
longer knows, fails here rather than in a user's first run. The image configs train two batches of
each epoch's worth on the tiny IDX set with their own model, optimizer and schedule."""

import pytest
from conftest import FAST, REPO, one_error_line, train

import export.main
from models.checkpoint import load_checkpoint, predictor_from_checkpoint
from train.main import main as train_main
from train.main import parse_args
from train.runtime import cpu_bf16_supported

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_the_named_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"product.yaml", "product_fast.yaml", "product_best.yaml", "mnist_mlp.yaml", "mnist_mlp_fast.yaml",
            "fashion_mnist_cnn.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path):
    cfg, resume = parse_args(["--config", str(path)])
    assert resume is None and cfg.run.epochs >= 1


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in CONFIGS if "mnist" in p.name], ids=lambda p: p.name)
def test_image_config_trains_and_its_checkpoint_rebuilds(path, image_dir, tmp_path, capsys):
    cfg, _ = parse_args(["--config", str(path)])
    args = ["--config", str(path), "--data-dir", str(image_dir), "--data.download", "false",
            "--data.val_size", "50", "--epochs", "4", "--run.max_batches", "4"]
    if cfg.run.precision == "bf16" and not cpu_bf16_supported():
        # A bf16 config on a CPU that would emulate bf16: one line that says so, and no run folder.
        assert train_main([*FAST, *args, "--out", str(tmp_path / "run")]) == 2
        assert "needs native bf16 instructions" in one_error_line(capsys.readouterr().err)
        assert not (tmp_path / "run").exists()
        pytest.skip("this CPU has no native bf16: the config's run was refused, as it should be")
    summary = train(args, tmp_path)
    assert summary["precision"] == ("fp32" if cfg.run.precision == "auto" else cfg.run.precision)  # auto on CPU
    # 4 epochs: the CNN's skipped epochs are 1 batch here, and its one-cycle needs 2 warm-up steps.
    assert summary["epochs_run"] == 4
    ckpt = load_checkpoint(tmp_path / "best.pt")
    assert ckpt["arch"] == cfg.arch and ckpt["model_config"] == cfg.model_fields
    assert ckpt["task"] == cfg.task.name and ckpt["task_ref"] is None  # a built-in task: nothing to import
    predictor_from_checkpoint(ckpt, cfg.task)  # the saved architecture rebuilds from the checkpoint and its task
    # The network each config ships exports with parity (TorchScript and onnxruntime against eager).
    assert export.main.main(["--checkpoint", str(tmp_path / "best.pt"), "--no-register",
                             "--data-dir", str(image_dir)]) == 0
    assert (tmp_path / "export" / "model.onnx").is_file()


def test_too_short_one_cycle_is_a_config_error(tmp_path, image_dir, capsys):
    # 2 epochs x 2 batches with a quarter warm-up: one warm-up step, where OneCycleLR divides by zero
    rc = train_main([*FAST, "--config", str(REPO / "configs" / "fashion_mnist_cnn.yaml"), "--data-dir",
                     str(image_dir), "--data.download", "false", "--data.val_size", "50", "--epochs", "2",
                     "--run.max_batches", "2", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and "sched.name onecycle needs more than one warm-up step" in err, err


# The README's Quality table claims these for the shipped product configs on the reference's 10,000-point
# test set; each trains in seconds, so the claim is checked as shipped (full data, its own seed).
@pytest.mark.slow
@pytest.mark.parametrize("name,max_mre", [("product_fast.yaml", 1.35), ("product_best.yaml", 0.15)])
def test_shipped_product_config_meets_its_claimed_quality(name, max_mre, tmp_path):
    summary = train(["--config", str(REPO / "configs" / name)], tmp_path / "run")
    assert summary["test"]["mre"] <= max_mre, summary["test"]
