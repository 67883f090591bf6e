"""models: the networks, the raw-units Predictor, and the checkpoint format (no training here)."""

import pickle
import re
import resource
import signal

import pytest
import torch

import models
import t2d
from models.checkpoint import CheckpointError, load_checkpoint, predictor_from_checkpoint, save_checkpoint
from models.normalize import Standardizer

TASKS = t2d.builtin_tasks()
PRODUCT, MNIST = TASKS["product"], TASKS["mnist"]
TASK_OF = {"product_mlp": PRODUCT, "mlp": MNIST, "cnn": MNIST}  # a built-in task that has each network


def build(arch: str, config: dict | None = None) -> models.Predictor:
    return models.build_predictor(TASK_OF[arch], arch, config)


@pytest.mark.parametrize("arch, params", [
    ("product_mlp", 193),  # the reference 2-16-8-1 network
    ("mlp", 101_770),  # the reference 784-128-10 network
    ("cnn", 61_674),  # "about 62K parameters with the default widths"
])
def test_default_architectures_have_the_reference_sizes(arch, params):
    net = build(arch).net
    assert sum(p.numel() for p in net.parameters()) == params


@pytest.mark.parametrize("arch, out", [("product_mlp", 1), ("mlp", 10), ("cnn", 10)])
@pytest.mark.parametrize("batch", [1, 3, 5])
def test_predictor_output_shape(arch, out, batch):
    model = build(arch).eval()
    x = torch.rand(batch, *TASK_OF[arch].input.shape)  # raw units: pixels in [0, 1]
    assert model(x).shape == (batch, out)


def test_model_config_options_change_the_network():
    net = build("product_mlp", {"hidden": [32, 16, 4], "activation": "tanh", "dropout": 0.1}).net
    linears = [m for m in net.layers if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2, 32), (32, 16), (16, 4), (4, 1)]
    assert sum(isinstance(m, torch.nn.Tanh) for m in net.layers) == 3
    assert sum(isinstance(m, torch.nn.Dropout) for m in net.layers) == 3
    cnn = build("cnn", {"channels": [4, 5, 6]}).net
    assert cnn.fc.in_features == 6 * 3 * 3 and cnn.fc.out_features == 10


def test_networks_take_their_sizes_from_the_task():
    """No in_features / num_classes in any config: the input shape and output size are the task's."""
    net = models.ProductMLP(models.ProductMLPConfig(hidden=[4]), 6, 2)
    assert [(m.in_features, m.out_features) for m in net.layers if isinstance(m, torch.nn.Linear)] == [(6, 4), (4, 2)]
    mlp = models.MLP(models.MLPConfig(hidden=5), (3, 8, 8), 3)
    assert (mlp.fc1.in_features, mlp.fc2.out_features) == (3 * 8 * 8, 3)
    cnn = models.CNN(models.CNNConfig(channels=[4, 5, 6]), (3, 16, 24), 4)
    assert cnn.features[0][0].in_channels == 3 and cnn.fc.in_features == 6 * 2 * 3 and cnn.fc.out_features == 4
    assert cnn(torch.zeros(2, 3, 16, 24)).shape == (2, 4)
    with pytest.raises(ValueError, match="at least 8x8"):
        models.CNN(models.CNNConfig(), (1, 7, 28), 10)
    for arch, task in TASK_OF.items():  # the built-in tasks size their networks from their Input and Output
        assert build(arch).eval()(torch.zeros(2, *task.input.shape)).shape == (2, task.output.size)
        assert not {"in_features", "num_classes"} & set(task.model_config(arch).__dict__)


def test_default_cnn_keeps_its_layers_and_state_dict_keys():
    """Checkpoints of the original CNN (conv, BatchNorm, ReLU, pool per block) must still load."""
    net = build("cnn").net
    for block in net.features:
        assert [type(m) for m in block] == [torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU, torch.nn.MaxPool2d]
    assert {k for k in net.state_dict() if k.startswith("features.0.")} == {
        "features.0.0.weight", "features.0.1.weight", "features.0.1.bias", "features.0.1.running_mean",
        "features.0.1.running_var", "features.0.1.num_batches_tracked"}


def test_cnn_block_options():
    base = build("cnn").net
    pool_first = build("cnn", {"pool_first": True}).net
    # The same parameters in another order: max-pool straight after the conv, BatchNorm and ReLU after it.
    assert sum(p.numel() for p in pool_first.parameters()) == sum(p.numel() for p in base.parameters())
    assert [type(m) for m in pool_first.features[0]] == [torch.nn.Conv2d, torch.nn.MaxPool2d, torch.nn.BatchNorm2d,
                                                         torch.nn.ReLU]
    deep = build("cnn", {"channels": [4, 6, 8], "convs_per_block": [1, 2, 3], "activation": "gelu",
                         "pool_first": True}).net
    convs = [[(m.in_channels, m.out_channels) for m in block if isinstance(m, torch.nn.Conv2d)]
             for block in deep.features]
    assert convs == [[(1, 4)], [(4, 6), (6, 6)], [(6, 8), (8, 8), (8, 8)]]
    assert sum(isinstance(m, torch.nn.GELU) for m in deep.modules()) == 6
    assert not any(isinstance(m, torch.nn.ReLU) for m in deep.modules())
    # pooling comes once per block, after the block's first conv: the block's other convs run at the pooled size
    conv, pool, bn, gelu = torch.nn.Conv2d, torch.nn.MaxPool2d, torch.nn.BatchNorm2d, torch.nn.GELU
    assert [type(m) for m in deep.features[2]] == [conv, pool, bn, gelu, conv, bn, gelu, conv, bn, gelu]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in deep.modules()) == 3
    assert deep(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_cnn_hidden_layer():
    base = build("cnn", {"channels": [4, 6, 8]}).net
    assert isinstance(base.hidden, torch.nn.Identity)  # no hidden layer: the default's state_dict keys stay
    wide = build("cnn", {"channels": [4, 6, 8], "hidden": 32}).net
    assert (wide.hidden[0].in_features, wide.hidden[0].out_features, wide.fc.in_features) == (8 * 3 * 3, 32, 32)
    assert wide(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("options", [
    {"activation": "silu"},
    {"activation": "gelu", "convs_per_block": [1, 1, 2], "pool_first": True},
    {"hidden": 16, "dropout": 0.1},
])
def test_cnn_options_train_a_step_and_round_trip(tmp_path, options):
    torch.manual_seed(0)
    model = build("cnn", {"channels": [4, 6, 8], **options})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    before = torch.nn.functional.cross_entropy(model(x), y)
    before.backward()
    opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.net.parameters())
    model.eval()
    save_checkpoint({"task": "mnist", "arch": "cnn", "model_config": {"channels": [4, 6, 8], **options},
                     "state_dict": model.state_dict(), "epoch": 1}, tmp_path / "m.pt")
    rebuilt = predictor_from_checkpoint(load_checkpoint(tmp_path / "m.pt"), MNIST)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


@pytest.mark.parametrize("arch, values", [
    ("product_mlp", {"hidden": []}),
    ("product_mlp", {"hidden": [8, 0]}),
    ("product_mlp", {"activation": "sigmoid"}),
    ("product_mlp", {"dropout": 1.0}),
    ("mlp", {"hidden": 0}),
    ("cnn", {"hidden": -1}),
    ("mlp", {"num_classes": 10}),  # sizes come from the task: no longer a config key
    ("product_mlp", {"in_features": 2}),
    ("cnn", {"channels": [8, 8]}),
    ("cnn", {"dropout": -0.1}),
    ("cnn", {"widths": [8, 8, 8]}),  # unknown key
    ("cnn", {"activation": "tanh"}),
    ("cnn", {"convs_per_block": [1, 1]}),
    ("cnn", {"convs_per_block": [1, 0, 1]}),
])
def test_bad_model_config_is_a_value_error(arch, values):
    with pytest.raises(ValueError):
        TASK_OF[arch].model_config(arch, values)


def test_size_keys_are_unknown_config_keys():
    with pytest.raises(ValueError, match="unknown model.num_classes"):
        MNIST.model_config("cnn", {"num_classes": 10})
    with pytest.raises(ValueError, match="unknown model.in_features"):
        models.build_predictor(PRODUCT, "product_mlp", {"in_features": 2})


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown model.arch 'resnet' for task mnist"):
        models.build_predictor(MNIST, "resnet")
    with pytest.raises(ValueError, match="unknown model.arch 'cnn' for task product"):
        models.build_predictor(PRODUCT, "cnn")  # an architecture of another task


def test_standardizer_fits_and_inverts():
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0], [8.0, 5.0]])
    s = Standardizer((2,)).fit(x)
    assert torch.allclose(s.mean, torch.tensor([4.0, 5.0]))
    assert torch.allclose(s.std, torch.tensor([x[:, 0].std().item(), 1.0]))  # a constant feature gets std 1
    z = s(x)
    assert torch.allclose(z[:, 0].mean(), torch.tensor(0.0), atol=1e-6)
    assert torch.allclose(z[:, 0].std(), torch.tensor(1.0), atol=1e-6)
    assert torch.allclose(s.inverse(z), x)
    assert s.to_dict() == {"mean": s.mean.tolist(), "std": s.std.tolist()}


def test_predictor_works_in_raw_units():
    torch.manual_seed(0)
    model = build("product_mlp").eval()
    x = 1 + 9 * torch.rand(64, 2)
    model.input_norms["0"].fit(x)
    model.target_norm.fit((x[:, :1] * x[:, 1:]))
    with torch.no_grad():
        expected = model.net((x - model.input_norms["0"].mean) / model.input_norms["0"].std) * model.target_norm.std \
            + model.target_norm.mean
        assert torch.equal(model(x), expected)
    # the statistics are buffers, so they travel with the state_dict
    assert {"input_norms.0.mean", "input_norms.0.std", "target_norm.mean", "target_norm.std"} <= set(model.state_dict())


def _payload(model: models.Predictor, arch: str, config: dict | None = None) -> dict:
    return {"task": "product", "arch": arch, "model_config": config or {},
            "state_dict": model.state_dict(), "epoch": 3, "metrics": {"loss": 0.5}}


def test_checkpoint_round_trip_rebuilds_the_same_predictor(tmp_path):
    torch.manual_seed(1)
    config = {"hidden": [12, 6], "activation": "gelu", "dropout": 0.0}
    model = build("product_mlp", config).eval()
    model.input_norms["0"].fit(1 + 9 * torch.rand(50, 2))
    save_checkpoint(_payload(model, "product_mlp", config), tmp_path / "m.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # the temp file was renamed away

    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["format"] == "train-to-deploy/checkpoint" and raw["format_version"] == 3
    rebuilt = predictor_from_checkpoint(load_checkpoint(tmp_path / "m.pt"), PRODUCT)
    assert not rebuilt.training
    x = 1 + 9 * torch.rand(7, 2)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    model = build("product_mlp")
    path = tmp_path / "last.pt"
    save_checkpoint(_payload(model, "product_mlp"), path)
    before = path.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        save_checkpoint({**_payload(model, "product_mlp"), "bad": lambda: 0}, path)  # lambdas do not pickle
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file size limits")
def test_write_that_fails_midway_keeps_the_previous_checkpoint(tmp_path):
    """A disk that fills up mid-write (here: a file size limit) must not cost the last good checkpoint."""
    model = build("product_mlp")
    path = tmp_path / "last.pt"
    save_checkpoint(_payload(model, "product_mlp"), path)
    before = path.read_bytes()
    big = {**_payload(model, "product_mlp"), "extra": torch.zeros(1_000_000)}  # ~4 MB
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG error instead of being killed
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, old_limit[1]))
    try:
        with pytest.raises(OSError):
            save_checkpoint(big, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def _one_line_error(path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def test_load_checkpoint_rejects_what_is_not_ours(tmp_path):
    assert "does not exist" in _one_line_error(tmp_path / "missing.pt")
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 8)
    assert "cannot read checkpoint" in _one_line_error(tmp_path / "noise.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "dict.pt")
    assert "not a train-to-deploy checkpoint" in _one_line_error(tmp_path / "dict.pt")
    torch.save(build("mlp").state_dict(), tmp_path / "state_dict.pt")
    assert "not a train-to-deploy checkpoint" in _one_line_error(tmp_path / "state_dict.pt")
    torch.save(build("mlp"), tmp_path / "module.pt")  # a pickled module: unsafe to load
    assert "cannot read checkpoint" in _one_line_error(tmp_path / "module.pt")


def test_load_checkpoint_checks_version_and_required_keys(tmp_path):
    model = build("product_mlp")
    save_checkpoint(_payload(model, "product_mlp"), tmp_path / "ok.pt")
    ckpt = torch.load(tmp_path / "ok.pt", weights_only=True)
    torch.save({**ckpt, "format_version": 99}, tmp_path / "future.pt")
    assert "format version 99" in _one_line_error(tmp_path / "future.pt")
    torch.save({k: v for k, v in ckpt.items() if k != "arch"}, tmp_path / "no_arch.pt")
    assert "lacks arch" in _one_line_error(tmp_path / "no_arch.pt")


def test_predictor_from_mismatched_checkpoint_is_a_checkpoint_error():
    state = build("product_mlp", {"hidden": [16, 8]}).state_dict()
    ckpt = {"task": "product", "arch": "product_mlp", "state_dict": state}
    with pytest.raises(CheckpointError, match="does not match"):
        predictor_from_checkpoint({**ckpt, "model_config": {"hidden": [4]}}, PRODUCT)
    with pytest.raises(CheckpointError, match="does not match"):
        predictor_from_checkpoint({**ckpt, "model_config": {"depth": 3}}, PRODUCT)
    with pytest.raises(CheckpointError, match="does not match"):
        predictor_from_checkpoint({**ckpt, "model_config": {"in_features": 2}}, PRODUCT)  # a version-1 key
    with pytest.raises(CheckpointError, match="trained on task 'product', not 'mnist'"):
        predictor_from_checkpoint({**ckpt, "model_config": {}}, MNIST)


def _v1_checkpoint(path, arch: str, task: str, model_config: dict, predictor: models.Predictor,
                   normalization: dict) -> None:
    """A checkpoint as format version 1 wrote it: sizes in model_config, image statistics in 0..255 units."""
    weights = {k.replace("input_norms.0.", "input_norm."): v for k, v in predictor.state_dict().items()}
    torch.save({"format": "train-to-deploy/checkpoint", "format_version": 1, "task": task, "arch": arch,
                "model_config": dict(model_config), "state_dict": weights,
                "normalization": normalization, "epoch": 2, "metrics": {"loss": 0.3},
                "config": {"run": {"task": task}, "model": {"arch": arch, **model_config}}}, path)


def test_version_1_image_checkpoint_is_upgraded_to_unit_pixels(tmp_path):
    """Version 1 trained image networks on pixels 0..255: loaded today, the same network answers on pixels / 255."""
    torch.manual_seed(3)
    old = build("mlp", {"hidden": 16}).eval()  # as version 1 used it: statistics in 0..255 units
    old.input_norms["0"].mean.fill_(33.0)
    old.input_norms["0"].std.fill_(78.5)
    _v1_checkpoint(tmp_path / "v1.pt", "mlp", "mnist", {"hidden": 16, "dropout": 0.0, "num_classes": 10}, old,
                   {"input": {"mean": [33.0], "std": [78.5]}})

    ckpt = load_checkpoint(tmp_path / "v1.pt")  # validated against the built-in mnist network
    assert ckpt["model_config"] == {"hidden": 16, "dropout": 0.0}  # num_classes dropped: the task sizes the net
    assert "num_classes" not in ckpt["config"]["model"]
    assert ckpt["normalization"]["input"] == {"mean": [33.0 / 255], "std": [78.5 / 255]}
    assert torch.allclose(ckpt["state_dict"]["input_norms.0.mean"], torch.tensor([33.0 / 255]))
    model = predictor_from_checkpoint(ckpt, MNIST)
    pixels = torch.randint(0, 256, (9, 1, 28, 28)).float()  # what version 1 was fed
    with torch.no_grad():
        want, got = old(pixels), model(pixels / 255)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
    assert torch.equal(got.argmax(1), want.argmax(1))
    # not the identity: without the upgrade, the 0..255 statistics would be applied to [0, 1] pixels
    with torch.no_grad():
        assert not torch.allclose(old(pixels / 255), want, atol=1e-2)


def test_version_1_product_checkpoint_keeps_its_statistics(tmp_path):
    torch.manual_seed(4)
    old = build("product_mlp").eval()
    old.input_norms["0"].fit(1 + 9 * torch.rand(50, 2))
    _v1_checkpoint(tmp_path / "v1.pt", "product_mlp", "product",
                   {"in_features": 2, "hidden": [16, 8], "activation": "relu", "dropout": 0.0}, old,
                   {"input": old.input_norms["0"].to_dict()})
    ckpt = load_checkpoint(tmp_path / "v1.pt")
    assert ckpt["model_config"] == {"hidden": [16, 8], "activation": "relu", "dropout": 0.0}
    # raw X1, X2: no pixel scaling
    assert torch.equal(ckpt["state_dict"]["input_norms.0.mean"], old.input_norms["0"].mean)
    x = 1 + 9 * torch.rand(5, 2)
    with torch.no_grad():
        assert torch.equal(predictor_from_checkpoint(ckpt, PRODUCT)(x), old(x))


def test_validation_builds_the_expected_network_without_memory():
    """A checkpoint's model_config may ask for any size: the expected weights are built on the meta device, so
    a config of 10^12 weights (4 TB) is refused by shape at once instead of being allocated."""
    state = build("product_mlp").state_dict()
    ckpt = {"task": "product", "arch": "product_mlp", "model_config": {"hidden": [10**6, 10**6]}, "state_dict": state}
    with pytest.raises(CheckpointError, match=re.escape("net.layers.0.weight has shape [16, 2], the network's is "
                                                        "[1000000, 2]")):
        predictor_from_checkpoint(ckpt, PRODUCT)
