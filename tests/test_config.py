"""train.config and train.main.parse_args: defaults, YAML, CLI overrides, and loud failures."""

import pytest

from train.config import ConfigError, build_config, coerce, load_yaml, parse_overrides
from train.main import parse_args


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg
    return msg


def test_task_defaults():
    product, _ = parse_args([])
    assert product.run.task == "product" and product.arch == "product_mlp"
    assert product.run.epochs == 1000 and product.data.batch_size == 100
    # no in_features: the network's sizes come from the task, not the config
    assert product.model == {"arch": "product_mlp", "hidden": [16, 8], "activation": "relu", "dropout": 0.0}
    assert product.run.threads == 1 and product.log.print_every == 50  # the rest of the task's defaults
    assert product.run.out == "runs/product"
    fashion, _ = parse_args(["--task", "fashion-mnist"])
    assert fashion.arch == "mlp" and fashion.run.epochs == 5
    assert fashion.data.batch_size == 64 and fashion.data.val_size == 5000
    assert fashion.run.out == "runs/fashion-mnist"


def test_yaml_then_cli_precedence(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "run: {epochs: 7, seed: 3}\n"
        "optim: {name: sgd, lr: 1e-3, momentum: 0.5}\n"  # PyYAML reads 1e-3 as a string
        "model: {hidden: [32, 16]}\n"
        "data: {batch_size: 50}\n"
    )
    cfg, resume = parse_args(["--config", str(tmp_path / "c.yaml"), "--optim.lr", "0.02", "--epochs", "9",
                              "--data.batch_size=25"])
    assert resume is None
    assert cfg.run.epochs == 9  # --epochs beats the file
    assert cfg.optim.lr == 0.02  # --section.field beats the file
    assert cfg.data.batch_size == 25
    assert cfg.run.seed == 3 and cfg.optim.name == "sgd" and cfg.optim.momentum == 0.5  # the file beats defaults
    assert cfg.model["hidden"] == [32, 16]
    assert cfg.log.print_every == 50  # a task default nobody overrode

    cfg, _ = parse_args(["--config", str(tmp_path / "c.yaml")])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)


def test_task_in_yaml_selects_task_defaults(tmp_path):
    (tmp_path / "c.yaml").write_text("run:\n  task: mnist\n")
    cfg, _ = parse_args(["--config", str(tmp_path / "c.yaml")])
    assert cfg.run.task == "mnist" and cfg.arch == "mlp" and cfg.data.batch_size == 64
    cfg, _ = parse_args(["--config", str(tmp_path / "c.yaml"), "--task", "product"])
    assert cfg.run.task == "product" and cfg.arch == "product_mlp"


@pytest.mark.parametrize("argv, field, value", [
    (["--model.hidden", "32,16"], "hidden", [32, 16]),
    (["--model.hidden", "[64, 8, 4]"], "hidden", [64, 8, 4]),
    (["--model.hidden=5"], "hidden", [5]),
    (["--model.activation=gelu"], "activation", "gelu"),
])
def test_model_overrides(argv, field, value):
    cfg, _ = parse_args(argv)
    assert cfg.model[field] == value


def test_changing_arch_starts_from_its_defaults():
    cfg, _ = parse_args(["--task", "mnist", "--model.arch", "cnn", "--model.channels", "8,16,16"])
    assert cfg.model == {"arch": "cnn", "channels": [8, 16, 16], "dropout": 0.2,
                         "activation": "relu", "convs_per_block": [1, 1, 1], "pool_first": False, "hidden": 0}


@pytest.mark.parametrize("argv, flag_value", [
    (["--data.hflip", "true"], True), (["--data.hflip=yes"], True), (["--data.hflip", "0"], False),
    (["--log.plots", "off"], False),
])
def test_booleans(argv, flag_value):
    cfg, _ = parse_args(["--task", "mnist", *argv])
    section, name = argv[0][2:].split("=")[0].split(".")
    assert getattr(getattr(cfg, section), name) is flag_value


@pytest.mark.parametrize("argv, expected", [
    (["--nope.x", "1"], "unknown config section 'nope'"),
    (["--optim.nope", "1"], "unknown config key optim.nope"),
    (["--model.channels", "8,8,8"], "unknown config key model.channels for arch product_mlp"),
    (["--epochs", "ten"], "run.epochs must be an integer"),
    (["--optim.lr", "fast"], "optim.lr must be a number"),
    (["--data.hflip", "maybe"], "data.hflip must be true or false"),
    (["--model.hidden", "a,b"], "model.hidden must be an integer"),
    (["--epochs", "-3"], "run.epochs must be >= 1"),
    (["--epochs", "0"], "run.epochs must be >= 1"),
    (["--optim.lr", "0"], "optim.lr must be > 0"),
    (["--optim.name", "lamb"], "optim.name must be one of"),
    (["--sched.name", "warmup"], "sched.name must be one of"),
    (["--sched.pct_start", "1.5"], "sched.pct_start must be in (0, 1)"),
    (["--device", "tpu"], "run.device must be one of"),
    (["--task", "cifar"], "unknown task 'cifar'"),
    (["--task", "mnist", "--model.arch", "product_mlp"], "unknown model.arch 'product_mlp' for task mnist"),
    # sizes come from the task: the old size keys are unknown keys, not values to validate
    (["--model.in_features", "2"], "unknown config key model.in_features for arch product_mlp"),
    (["--task", "mnist", "--model.num_classes", "10"], "unknown config key model.num_classes for arch mlp"),
    (["--task", "fashion-mnist", "--model.arch", "cnn", "--model.num_classes", "10"],
     "unknown config key model.num_classes for arch cnn"),
    (["--task", "product", "--data.hflip", "true"], "data.crop_padding and data.hflip augment images"),
    (["--task", "mnist", "--data.crop_padding", "28"], "data.crop_padding must be in [0, 27]"),
    (["--model.arch", "resnet"], "unknown model.arch 'resnet'"),
    (["--model.dropout", "1.5"], "model.dropout must be in [0, 1)"),
    (["--optim.label_smoothing", "1"], "optim.label_smoothing must be in [0, 1)"),
    (["--optim.ema", "1"], "optim.ema must be in [0, 1)"),
    (["--task", "mnist", "--model.arch", "cnn", "--model.activation", "tanh"], "model.activation must be one of"),
    (["--task", "mnist", "--stop.monitor", "mse"], "stop.monitor must be one of loss, accuracy"),
    (["--optim.lr"], "--optim.lr needs a value"),
    (["stray"], "unexpected argument 'stray'"),
    (["--optim.lr.x", "1"], "bad override --optim.lr.x"),
])
def test_bad_config_is_one_line_config_error(argv, expected):
    with pytest.raises(ConfigError) as e:
        parse_args(argv)
    assert expected in one_line(e)


@pytest.mark.parametrize("text, expected", [
    ("optim: {lr: [unclosed\n", "is not valid YAML"),
    ("- just\n- a list\n", "must hold a mapping"),
    ("optim: 3\n", "config section 'optim' must be a mapping"),
    ("training: {lr: 1}\n", "unknown config section 'training'"),
    ("optim: {learning_rate: 1}\n", "unknown config key optim.learning_rate"),
    ("run: {epochs: 2.5}\n", "run.epochs must be an integer"),
    ("data: {hflip: 2}\n", "data.hflip must be true or false"),
])
def test_bad_yaml_is_one_line_config_error(tmp_path, text, expected):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        parse_args(["--config", str(tmp_path / "c.yaml")])
    assert expected in one_line(e)


def test_missing_and_empty_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(str(tmp_path / "missing.yaml"))
    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml(str(tmp_path / "empty.yaml")) == {}


def test_parse_overrides_forms():
    assert parse_overrides(["--optim.lr", "0.1", "--model.hidden=[4, 2]", "--data.hflip=true"]) == {
        "optim": {"lr": "0.1"}, "model": {"hidden": "[4, 2]"}, "data": {"hflip": "true"}}


@pytest.mark.parametrize("value, tp, expected", [
    ("3", int, 3), (3, float, 3.0), ("1e-4", float, 1e-4), ("off", bool, False), ("[1,2]", list[int], [1, 2]),
    ((4, 5), list[int], [4, 5]), ("none", int | None, None), ("7", int | None, 7),
])
def test_coerce(value, tp, expected):
    got = coerce(value, tp, "x")
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("value, tp", [(True, int), (1.5, int), ("x", float), (True, float), (3, str), (5, list[int])])
def test_coerce_rejects(value, tp):
    with pytest.raises(ConfigError):
        coerce(value, tp, "x")


def test_build_config_layers_apply_in_order():
    cfg = build_config(None, [{"optim": {"lr": 0.5}}, {"optim": {"lr": "0.25"}, "run": {"task": "mnist"}}])
    assert cfg.optim.lr == 0.25 and cfg.run.task == "mnist" and cfg.arch == "mlp"
