"""models: the networks, the raw-units Predictor, and the checkpoint format (no training here)."""

import pickle
import resource
import signal

import pytest
import torch

import models
from models.checkpoint import CheckpointError, load_checkpoint, predictor_from_checkpoint, save_checkpoint
from models.normalize import Standardizer


@pytest.mark.parametrize("arch, params", [
    ("product_mlp", 193),  # the reference 2-16-8-1 network
    ("mlp", 101_770),  # the reference 784-128-10 network
    ("cnn", 61_674),  # "about 62K parameters with the default widths"
])
def test_default_architectures_have_the_reference_sizes(arch, params):
    net = models.build_predictor(arch).net
    assert sum(p.numel() for p in net.parameters()) == params


@pytest.mark.parametrize("arch, out", [("product_mlp", 1), ("mlp", 10), ("cnn", 10)])
@pytest.mark.parametrize("batch", [1, 3, 5])
def test_predictor_output_shape(arch, out, batch):
    model = models.build_predictor(arch).eval()
    x = torch.rand(batch, *models.input_shape(arch)) * 255
    assert model(x).shape == (batch, out)


def test_model_config_options_change_the_network():
    net = models.build_predictor("product_mlp", {"hidden": [32, 16, 4], "activation": "tanh", "dropout": 0.1}).net
    linears = [m for m in net.layers if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2, 32), (32, 16), (16, 4), (4, 1)]
    assert sum(isinstance(m, torch.nn.Tanh) for m in net.layers) == 3
    assert sum(isinstance(m, torch.nn.Dropout) for m in net.layers) == 3
    cnn = models.build_predictor("cnn", {"channels": [4, 5, 6], "num_classes": 3}).net
    assert cnn.fc.in_features == 6 * 3 * 3 and cnn.fc.out_features == 3


def test_default_cnn_keeps_its_layers_and_state_dict_keys():
    """Checkpoints of the original CNN (conv, BatchNorm, ReLU, pool per block) must still load."""
    net = models.build_predictor("cnn").net
    for block in net.features:
        assert [type(m) for m in block] == [torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU, torch.nn.MaxPool2d]
    assert {k for k in net.state_dict() if k.startswith("features.0.")} == {
        "features.0.0.weight", "features.0.1.weight", "features.0.1.bias", "features.0.1.running_mean",
        "features.0.1.running_var", "features.0.1.num_batches_tracked"}


def test_cnn_block_options():
    base = models.build_predictor("cnn").net
    pool_first = models.build_predictor("cnn", {"pool_first": True}).net
    # The same parameters in another order: max-pool straight after the conv, BatchNorm and ReLU after it.
    assert sum(p.numel() for p in pool_first.parameters()) == sum(p.numel() for p in base.parameters())
    assert [type(m) for m in pool_first.features[0]] == [torch.nn.Conv2d, torch.nn.MaxPool2d, torch.nn.BatchNorm2d,
                                                         torch.nn.ReLU]
    deep = models.build_predictor("cnn", {"channels": [4, 6, 8], "convs_per_block": [1, 2, 3],
                                          "activation": "gelu", "pool_first": True}).net
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
    base = models.build_predictor("cnn", {"channels": [4, 6, 8]}).net
    assert isinstance(base.hidden, torch.nn.Identity)  # no hidden layer: the default's state_dict keys stay
    wide = models.build_predictor("cnn", {"channels": [4, 6, 8], "hidden": 32}).net
    assert (wide.hidden[0].in_features, wide.hidden[0].out_features, wide.fc.in_features) == (8 * 3 * 3, 32, 32)
    assert wide(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("options", [
    {"activation": "silu"},
    {"activation": "gelu", "convs_per_block": [1, 1, 2], "pool_first": True},
    {"hidden": 16, "dropout": 0.1},
])
def test_cnn_options_train_a_step_and_round_trip(tmp_path, options):
    torch.manual_seed(0)
    model = models.build_predictor("cnn", {"channels": [4, 6, 8], **options})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(16, 1, 28, 28) * 255, torch.randint(0, 10, (16,))
    before = torch.nn.functional.cross_entropy(model(x), y)
    before.backward()
    opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.net.parameters())
    model.eval()
    save_checkpoint({"task": "mnist", "arch": "cnn", "model_config": {"channels": [4, 6, 8], **options},
                     "state_dict": model.state_dict(), "epoch": 1}, tmp_path / "m.pt")
    rebuilt = predictor_from_checkpoint(load_checkpoint(tmp_path / "m.pt"))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


@pytest.mark.parametrize("arch, values", [
    ("product_mlp", {"hidden": []}),
    ("product_mlp", {"hidden": [8, 0]}),
    ("product_mlp", {"activation": "sigmoid"}),
    ("product_mlp", {"dropout": 1.0}),
    ("mlp", {"hidden": 0}),
    ("cnn", {"hidden": -1}),
    ("mlp", {"num_classes": 1}),
    ("cnn", {"channels": [8, 8]}),
    ("cnn", {"dropout": -0.1}),
    ("cnn", {"widths": [8, 8, 8]}),  # unknown key
    ("cnn", {"activation": "tanh"}),
    ("cnn", {"convs_per_block": [1, 1]}),
    ("cnn", {"convs_per_block": [1, 0, 1]}),
])
def test_bad_model_config_is_a_value_error(arch, values):
    with pytest.raises(ValueError):
        models.model_config(arch, values)


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown model architecture"):
        models.build_predictor("resnet")


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
    model = models.build_predictor("product_mlp").eval()
    x = 1 + 9 * torch.rand(64, 2)
    model.input_norm.fit(x)
    model.target_norm.fit((x[:, :1] * x[:, 1:]))
    with torch.no_grad():
        expected = model.net((x - model.input_norm.mean) / model.input_norm.std) * model.target_norm.std \
            + model.target_norm.mean
        assert torch.equal(model(x), expected)
    # the statistics are buffers, so they travel with the state_dict
    assert {"input_norm.mean", "input_norm.std", "target_norm.mean", "target_norm.std"} <= set(model.state_dict())


def _payload(model: models.Predictor, arch: str, config: dict | None = None) -> dict:
    return {"task": "product", "arch": arch, "model_config": config or {},
            "state_dict": model.state_dict(), "epoch": 3, "metrics": {"loss": 0.5}}


def test_checkpoint_round_trip_rebuilds_the_same_predictor(tmp_path):
    torch.manual_seed(1)
    config = {"hidden": [12, 6], "activation": "gelu", "in_features": 2, "dropout": 0.0}
    model = models.build_predictor("product_mlp", config).eval()
    model.input_norm.fit(1 + 9 * torch.rand(50, 2))
    save_checkpoint(_payload(model, "product_mlp", config), tmp_path / "m.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # the temp file was renamed away

    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["format"] == "train-to-deploy/checkpoint" and raw["format_version"] == 1
    rebuilt = predictor_from_checkpoint(load_checkpoint(tmp_path / "m.pt"))
    assert not rebuilt.training
    x = 1 + 9 * torch.rand(7, 2)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    model = models.build_predictor("product_mlp")
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
    model = models.build_predictor("product_mlp")
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
    torch.save(models.build_predictor("mlp").state_dict(), tmp_path / "state_dict.pt")
    assert "not a train-to-deploy checkpoint" in _one_line_error(tmp_path / "state_dict.pt")
    torch.save(models.build_predictor("mlp"), tmp_path / "module.pt")  # a pickled module: unsafe to load
    assert "cannot read checkpoint" in _one_line_error(tmp_path / "module.pt")


def test_load_checkpoint_checks_version_and_required_keys(tmp_path):
    model = models.build_predictor("product_mlp")
    save_checkpoint(_payload(model, "product_mlp"), tmp_path / "ok.pt")
    ckpt = torch.load(tmp_path / "ok.pt", weights_only=True)
    torch.save({**ckpt, "format_version": 99}, tmp_path / "future.pt")
    assert "format version 99" in _one_line_error(tmp_path / "future.pt")
    torch.save({k: v for k, v in ckpt.items() if k != "arch"}, tmp_path / "no_arch.pt")
    assert "lacks arch" in _one_line_error(tmp_path / "no_arch.pt")


def test_predictor_from_mismatched_checkpoint_is_a_checkpoint_error():
    state = models.build_predictor("product_mlp", {"hidden": [16, 8]}).state_dict()
    with pytest.raises(CheckpointError, match="does not match"):
        predictor_from_checkpoint({"arch": "product_mlp", "model_config": {"hidden": [4]}, "state_dict": state})
    with pytest.raises(CheckpointError, match="does not match"):
        predictor_from_checkpoint({"arch": "product_mlp", "model_config": {"depth": 3}, "state_dict": state})
