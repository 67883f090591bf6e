"""optim.ema: the moving average of the weights is the model that is validated, saved, tested and exported, while
training itself runs as without it; resume continues both bit for bit."""

import json

import torch
from conftest import PRODUCT, assert_same_weights, history, state, task_data, train
from test_train import assert_resume_matches, image_args

import t2d
from export.main import main as export_main
from models import build_predictor
from models.checkpoint import load_checkpoint, predictor_from_checkpoint
from train.average import WeightAverage
from train.engine import evaluate
from train.runtime import Runtime

CPU = Runtime(torch.device("cpu"), "fp32")
# SGD at a constant rate on 256 points, batches of 100: three steps an epoch.
SGD = [*PRODUCT, "--optim.name", "sgd", "--optim.lr", "0.05", "--epochs", "1"]


def test_the_average_is_the_bias_corrected_moving_average_of_the_steps(tmp_path):
    """The averaged weights after three steps, from the weights of three runs without averaging that stop after
    one, two and three steps: the bias-corrected moving average sum_n (1 - d) d^(3-n) w_n / (1 - d^3), in which the
    initial weights have no part."""
    decay = 0.5
    steps = [state(train([*SGD, "--run.max_batches", str(n)], tmp_path / f"w{n}") and tmp_path / f"w{n}" / "last.pt")
             for n in (1, 2, 3)]
    train([*SGD, "--optim.ema", str(decay)], tmp_path / "ema")
    ckpt = load_checkpoint(tmp_path / "ema" / "best.pt")
    for k in (k for k in steps[0] if k.startswith("net.")):
        average = sum((1 - decay) * decay ** (3 - n) * w[k].double() for n, w in enumerate(steps, 1)) / (1 - decay ** 3)
        assert torch.allclose(ckpt["state_dict"][k].double(), average, atol=1e-6), k
    # Training itself is unchanged: the trained weights behind the average are the plain run's.
    assert ckpt["resume"]["average_steps"] == 3
    assert_same_weights(ckpt["resume"]["training_weights"], {k[4:]: v for k, v in steps[2].items()
                                                             if k.startswith("net.")})
    assert not any(torch.allclose(ckpt["state_dict"][k], steps[2][k]) for k in steps[2] if k.startswith("net."))


def test_batchnorm_cnn_validates_tests_and_exports_the_average(tmp_path, image_dir):
    args = [*image_args(image_dir, "fashion-mnist", "cnn"), "--model.dropout", "0.3", "--epochs", "2",
            "--optim.ema", "0.9"]
    summary = train(args, tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    trained = ckpt["resume"]["training_weights"]
    # BatchNorm's running statistics are averaged too; its batch count is the trained network's.
    statistics = [k for k in trained if k.endswith(("running_mean", "running_var"))]
    assert statistics and not any(torch.equal(ckpt["state_dict"]["net." + k], trained[k]) for k in statistics)
    counts = [k for k in trained if k.endswith("num_batches_tracked")]
    assert counts and all(torch.equal(ckpt["state_dict"]["net." + k], trained[k]) for k in counts)
    # The test and validation figures are the averaged model's, as the checkpoint alone rebuilds it.
    model = predictor_from_checkpoint(ckpt, t2d.builtin_tasks()["fashion-mnist"])
    data = task_data("fashion-mnist", image_dir, 50)
    test = evaluate(model, data.test_x, data.test_y, False, 2048, CPU)
    assert test["accuracy"] == summary["test"]["accuracy"]
    assert abs(test["loss"] - summary["test"]["loss"]) <= 1e-6 * test["loss"]
    val = evaluate(model, data.val_x, data.val_y, False, 2048, CPU)
    assert val["accuracy"] == history(tmp_path / "run")[-1]["val_accuracy"]
    # The trained weights score otherwise: the figures above are not theirs.
    model.net.load_state_dict(trained)
    assert evaluate(model, data.test_x, data.test_y, False, 2048, CPU)["loss"] != test["loss"]
    # The export is the averaged model's, with parity.
    assert export_main(["--checkpoint", str(tmp_path / "run" / "best.pt"), "--out", str(tmp_path / "export"),
                        "--no-register", "--format", "onnx"]) == 0
    assert json.loads((tmp_path / "export" / "parity.json").read_text())["passed"]


def test_resume_continues_the_average_and_the_training_exactly(tmp_path, image_dir):
    args = [*image_args(image_dir, "fashion-mnist", "cnn"), "--model.dropout", "0.3", "--optim.ema", "0.9"]
    s1 = train([*args, "--epochs", "3"], tmp_path / "straight")
    train([*args, "--epochs", "1"], tmp_path / "resumed")
    s2 = train(["--resume", str(tmp_path / "resumed" / "last.pt"), "--epochs", "3"], tmp_path / "resumed")
    assert_resume_matches(tmp_path / "straight", tmp_path / "resumed", s1, s2)
    a, b = (torch.load(p / "last.pt", weights_only=True)["resume"] for p in (tmp_path / "straight",
                                                                              tmp_path / "resumed"))
    assert a["average_steps"] == b["average_steps"] == 15  # 250 images, batches of 50, 3 epochs
    assert_same_weights(a["training_weights"], b["training_weights"])


def test_weight_average_follows_the_live_network_in_place():
    """WeightAverage reads the network's own tensors: a change to the trained weights reaches the next update."""
    predictor = build_predictor(t2d.builtin_tasks()["product"], "product_mlp", None)
    average = WeightAverage(predictor, 0.5)
    before = {k: v.clone() for k, v in average.model().net.state_dict().items()}
    with torch.no_grad():
        for p in predictor.net.parameters():
            p.add_(1.0)
    average.update()  # the first update is the weights themselves, as a bias-corrected average is
    for k, v in average.model().net.state_dict().items():
        assert torch.allclose(v, before[k] + 1), k
    with torch.no_grad():
        for p in predictor.net.parameters():
            p.add_(1.0)
    average.update()  # (0.5 * (w + 1) + (w + 2)) / 1.5
    for k, v in average.model().net.state_dict().items():
        assert torch.allclose(v, before[k] + 5 / 3), k
