"""Selective training (data.skip_easiest): which examples each epoch trains on, with real training.

The unit tests drive train.select.HardExamples with known losses; the training tests read the
per-example losses a real run saves in last.pt to see which examples an epoch trained on.
"""

import math

import pytest
import torch
from conftest import PRODUCT, history, train
from test_train import assert_resume_matches, image_args

from train.config import ConfigError
from models.checkpoint import save_checkpoint
from train.main import main, parse_args
from train.select import HardExamples

CPU = torch.device("cpu")


def test_first_epoch_takes_every_example_then_the_hardest():
    hard = HardExamples(10, 0.4, CPU)
    assert hard.keep == 6 and hard.indices() is None  # no losses yet: the whole set
    hard.record(torch.arange(10), torch.arange(10.0))
    hard.end_epoch()
    assert hard.indices().tolist() == [4, 5, 6, 7, 8, 9]
    # 8 and 9 trained on again and now easy; the skipped 0..3 keep their old losses and come back.
    hard.record(torch.tensor([9, 8]), torch.tensor([0.5, 0.25]))
    hard.end_epoch()
    assert hard.last.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0.25, 0.5]
    assert hard.indices().tolist() == [2, 3, 4, 5, 6, 7]


def test_an_example_seen_twice_in_an_epoch_gets_its_mean_loss():
    # torchrun pads the last shard by repeating examples: both losses count, once each.
    hard = HardExamples(3, 0.5, CPU)
    hard.record(torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 3.0]))
    hard.record(torch.tensor([0]), torch.tensor([5.0]))
    hard.end_epoch()
    assert hard.last.tolist() == [3.0, 2.0, 3.0]
    hard.end_epoch()  # an epoch that saw nothing changes nothing
    assert hard.last.tolist() == [3.0, 2.0, 3.0]


@pytest.mark.parametrize("state", [None, {}, {"last": [1.0, 2.0]}, {"last": torch.zeros(4)},
                                   {"last": torch.zeros(3, dtype=torch.long)},
                                   {"last": torch.tensor([0.0, math.nan, 1.0])},
                                   {"last": torch.tensor([0.0, -1.0, 1.0])}])
def test_saved_losses_that_do_not_fit_are_refused(state):
    hard = HardExamples(3, 0.5, CPU)
    with pytest.raises(ValueError):
        hard.load_state(state)
    assert torch.isinf(hard.last).all()  # left as it was


def test_saved_losses_load():
    hard = HardExamples(3, 0.5, CPU)
    hard.load_state({"last": torch.tensor([0.5, math.inf, 2.0])})  # inf: an example never trained on
    assert hard.indices().tolist() == [1, 2]


def saved_losses(out) -> torch.Tensor:
    return torch.load(out / "last.pt", weights_only=True)["resume"]["hard_examples"]["last"]


def test_each_later_epoch_trains_on_the_hardest_examples_only(tmp_path, image_dir):
    # 250 training images: epoch 1 trains on all 250, epoch 2 on the 150 with the highest loss.
    args = [*image_args(image_dir, "fashion-mnist", "cnn"), "--data.skip_easiest", "0.4"]
    train([*args, "--epochs", "1"], tmp_path)
    after_1 = saved_losses(tmp_path)
    assert after_1.shape == (250,) and torch.isfinite(after_1).all()
    train(["--resume", str(tmp_path / "last.pt"), "--epochs", "2"], tmp_path)
    after_2 = saved_losses(tmp_path)
    hardest = torch.zeros(250, dtype=torch.bool)
    hardest[after_1.topk(150).indices] = True
    assert torch.equal(after_2[~hardest], after_1[~hardest])  # the 100 easiest were not trained on
    assert (after_2[hardest] != after_1[hardest]).all()  # every one of the 150 hardest was


def test_skipping_shortens_the_one_cycle_schedule_and_resumes_exactly(tmp_path, image_dir):
    args = [*image_args(image_dir, "fashion-mnist", "cnn"), "--data.skip_easiest", "0.4", "--sched.name", "onecycle",
            "--sched.pct_start", "0.3", "--epochs", "4"]
    s1 = train(args, tmp_path / "straight")
    target = history(tmp_path / "straight")[1]["val_loss"]  # reached at epoch 2: cut the run there
    cut = train([*args, "--stop.target", repr(target)], tmp_path / "resumed")
    assert cut["epochs_run"] == 2
    s2 = train(["--resume", str(tmp_path / "resumed" / "last.pt"), "--stop.target", "0"], tmp_path / "resumed")
    assert_resume_matches(tmp_path / "straight", tmp_path / "resumed", s1, s2)
    resume = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["resume"]
    # Batches of 50: 5 steps in epoch 1, then 3 for 150 images in each of the other three. The schedule
    # ends exactly with the run: planned for 4 full epochs it would stop at 14 of 20 steps, not annealed.
    assert resume["scheduler"]["total_steps"] == resume["scheduler"]["last_epoch"] == 5 + 3 * 3


def test_product_task_trains_with_skipping(tmp_path):
    s = train([*PRODUCT, "--epochs", "3", "--data.skip_easiest", "0.5"], tmp_path)
    assert s["epochs_run"] == 3 and math.isfinite(s["test"]["mre"])
    assert saved_losses(tmp_path).shape == (256,)


def test_skip_easiest_refusals(tmp_path, image_dir):
    args = image_args(image_dir, "fashion-mnist", "cnn")
    train([*args, "--epochs", "1", "--data.skip_easiest", "0.4"], tmp_path)
    with pytest.raises(ConfigError, match="data.skip_easiest was 0.4 in the checkpoint"):
        parse_args(["--resume", str(tmp_path / "last.pt"), "--epochs", "2", "--data.skip_easiest", "0.2"])
    with pytest.raises(ConfigError, match="does not apply to optim.name lbfgs"):
        parse_args([*PRODUCT, "--optim.name", "lbfgs", "--data.skip_easiest", "0.5"])
    for bad in ("1", "-0.1", "nan"):
        with pytest.raises(ConfigError, match="data.skip_easiest must be"):
            parse_args([*PRODUCT, "--data.skip_easiest", bad])


def test_saved_losses_of_another_training_set_are_refused_before_the_run_folder_changes(tmp_path, image_dir, capsys):
    train([*image_args(image_dir, "fashion-mnist", "cnn"), "--epochs", "1", "--data.skip_easiest", "0.4"], tmp_path)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    ckpt["resume"]["hard_examples"]["last"] = torch.ones(10)  # saved from a 10-image training set
    save_checkpoint(ckpt, tmp_path / "other.pt")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["--resume", str(tmp_path / "other.pt"), "--epochs", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: the checkpoint's training state does not fit this training set: its per-example "
                   "losses are [10], not 250 floats for this training set")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
