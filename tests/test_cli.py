"""`python -m train` as a user runs it: mistakes end with a non-zero exit and one line on stderr, never a traceback.

The common mistakes run as real `python -m train` processes from a folder that is not the
repository. Each process pays torch's import (~3 s of CPU), so they run two at a time in the
background; rarer mistakes go through `train.main.main`, the function `python -m train` calls,
in this process.
"""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import FAST, PRODUCT, cli, predictor, write_image_set

from models.checkpoint import save_checkpoint
from t2d.idx import IDX_FILES
from train.main import main

# name -> (arguments, text the one error line must contain); {tmp} is the module's scratch folder
BAD_CLI = {
    "unknown task": (["--task", "cifar"], "unknown task 'cifar'"),
    "unknown key": (["--optim.learning_rate", "0.1"], "unknown config key optim.learning_rate"),
    "wrong type": (["--epochs", "ten"], "run.epochs must be an integer"),
    "negative epochs": (["--epochs", "-3"], "run.epochs must be >= 1"),
    "missing data folder": (["--task", "mnist", "--data-dir", "{tmp}/nope", "--data.download", "false"],
                            "no MNIST IDX files in {tmp}/nope"),
    "random-bytes checkpoint": (["--resume", "{tmp}/noise.pt"], "cannot read checkpoint {tmp}/noise.pt"),
    "foreign checkpoint": (["--resume", "{tmp}/dict.pt"], "is not a train-to-deploy checkpoint"),
    "missing checkpoint": (["--resume", "{tmp}/missing.pt"], "checkpoint {tmp}/missing.pt does not exist"),
    "bad YAML": (["--config", "{tmp}/bad.yaml"], "is not valid YAML"),
}
BAD_IN_PROCESS = {
    "unknown section": (["--training.lr", "0.1"], "unknown config section 'training'"),
    "unexpected flag": (["--verbose"], "unexpected argument '--verbose'"),
    "wrong bool": (["--log.plots", "maybe"], "log.plots must be true or false"),
    "bad choice": (["--optim.name", "lamb"], "optim.name must be one of"),
    "truncated IDX file": (["--task", "fashion-mnist", "--data-dir", "{tmp}/truncated", "--data.download", "false",
                            "--data.val_size", "10"], "is truncated or padded"),
    "bare state_dict checkpoint": (["--resume", "{tmp}/state_dict.pt"], "is not a train-to-deploy checkpoint"),
    "checkpoint without training state": (["--resume", "{tmp}/weights.pt"], "has no training state"),
    "missing YAML": (["--config", "{tmp}/missing.yaml"], "config file {tmp}/missing.yaml does not exist"),
    "YAML that is a list": (["--config", "{tmp}/list.yaml"], "must hold a mapping of sections"),
    # 10^12 weights (4 TB): the allocation fails on any machine, and the answer is one line
    "model too large for memory": (["--task", "product", "--model.hidden", "[1000000, 1000000]"],
                                   "out of memory (tried to allocate 4000000000000 bytes)"),
    "product data too large": (["--task", "product", "--data.size", "1000000000"], "data.size must be in [2, 100000000]"),
    "cuda without a GPU": (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"],
                           "run.device"),
}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A folder with the bad inputs: noise, foreign pickles, a half-written IDX file, broken YAML."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "noise.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"epoch": 3, "weights": torch.ones(2)}, tmp / "dict.pt")
    torch.save(predictor("product", "product_mlp").state_dict(), tmp / "state_dict.pt")
    save_checkpoint({"task": "product", "arch": "product_mlp", "model_config": {}, "epoch": 1,
                     "state_dict": predictor("product", "product_mlp").state_dict()},
                    tmp / "weights.pt")  # ours, but without optimizer and RNG state
    (tmp / "bad.yaml").write_text("optim:\n  lr: [0.1\n")
    (tmp / "list.yaml").write_text("- optim\n- lr\n")
    write_image_set(tmp / "truncated", gz=False, n_train=30, n_test=10)
    images = tmp / "truncated" / IDX_FILES["train_images"]
    images.write_bytes(images.read_bytes()[:-392])  # the last image half missing, as after a cut download
    return tmp


@pytest.fixture(scope="module")
def processes(scratch):
    """The CLI runs, started in the background two at a time: name -> Future of CompletedProcess."""
    pool = ThreadPoolExecutor(max_workers=2)
    jobs = {"train": pool.submit(cli, [*FAST, *PRODUCT, "--epochs", "2"], scratch)}  # no --out: runs/ under cwd
    for name, (args, _) in BAD_CLI.items():
        jobs[name] = pool.submit(cli, [*FAST, "--out", f"{scratch}/out", *[a.format(tmp=scratch) for a in args]],
                                 scratch)
    yield jobs
    pool.shutdown(wait=True, cancel_futures=True)


def assert_one_error_line(err: str, expected: str) -> None:
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0]


@pytest.mark.parametrize("name", list(BAD_IN_PROCESS))
def test_user_error_in_process(scratch, capsys, name):
    args, expected = BAD_IN_PROCESS[name]
    rc = main([*FAST, "--out", f"{scratch}/out", *[a.format(tmp=scratch) for a in args]])
    assert rc == 2
    assert_one_error_line(capsys.readouterr().err, expected.format(tmp=scratch))


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--task", "--out", "--epochs", "--seed", "--device", "--data-dir", "--config", "--resume"):
        assert flag in out
    assert out.count("default") >= 9  # every flag states its default


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BAD_CLI))
def test_user_error_from_the_command_line(processes, scratch, name):
    result = processes[name].result()
    assert result.returncode == 2, result.stderr
    assert_one_error_line(result.stderr, BAD_CLI[name][1].format(tmp=scratch))
    assert not (scratch / "out" / "last.pt").exists()


@pytest.mark.slow
def test_train_from_another_folder(processes, scratch):
    result = processes["train"].result()
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    run = scratch / "runs" / "product"  # the default run folder, relative to where it was started
    assert {"config.yaml", "last.pt", "best.pt", "metrics.jsonl", "summary.json"} <= {p.name for p in run.iterdir()}
    assert "epoch    1/2" in result.stdout and "epoch    2/2" in result.stdout
    assert "done: 2 epochs" in result.stdout and "device: cpu precision: fp32" in result.stdout
