"""Data: IDX files (gzipped and raw, torchvision's layout, corrupt ones), the built-in tasks' splits as training
loads them (train.data), batches, augmentation."""

import gzip
import os
import struct

import numpy as np
import pytest
import torch
from conftest import class_images, task_data, write_idx, write_image_set

from t2d import DataError, DataOptions
from t2d.builtin import product
from t2d.builtin.images import DEBIAN_FASHION_MNIST, idx_files
from t2d.idx import IDX_FILES, read_idx
from train.data import Augment, batch_order, sampler_shard, tensor_shard
from train.main import parse_args, run

# (name, torchvision's name, extra folders) of the built-in image tasks, as t2d.builtin.images declares them
IMAGE_TASKS = {"mnist": ("mnist", "MNIST", ()),
               "fashion-mnist": ("fashion-mnist", "FashionMNIST", (DEBIAN_FASHION_MNIST,))}


def find_idx_files(task: str, data_dir: str, download: bool):
    return idx_files(*IMAGE_TASKS[task], DataOptions(dir=data_dir, download=download))


def one_line_data_error(fn, *args) -> str:
    with pytest.raises(DataError) as e:
        fn(*args)
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_read_idx_round_trips_uint8(tmp_path, name):
    images, _ = class_images(12, seed=0)
    got = read_idx(write_idx(tmp_path / name, images))
    assert got.dtype == np.uint8 and got.shape == (12, 28, 28)
    assert np.array_equal(got, images)


def test_read_idx_other_dtypes_and_labels(tmp_path):
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    assert np.array_equal(read_idx(write_idx(tmp_path / "labels", labels)), labels)
    values = np.array([[1, -2], [70000, 5]], dtype=">i4")  # IDX type 0x0C: big-endian int32
    (tmp_path / "ints").write_bytes(bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 2) + values.tobytes())
    assert read_idx(tmp_path / "ints").tolist() == [[1, -2], [70000, 5]]


def test_corrupt_idx_files_are_one_line_data_errors(tmp_path):
    images, _ = class_images(4, seed=0)
    good = write_idx(tmp_path / "good", images).read_bytes()

    (tmp_path / "truncated").write_bytes(good[:-100])
    assert "truncated" in one_line_data_error(read_idx, tmp_path / "truncated")
    (tmp_path / "padded").write_bytes(good + b"\0")
    assert "padded" in one_line_data_error(read_idx, tmp_path / "padded")
    (tmp_path / "header").write_bytes(good[:10])
    assert "truncated (header)" in one_line_data_error(read_idx, tmp_path / "header")
    (tmp_path / "magic").write_bytes(b"PK\x03\x04" + good[4:])
    assert "bad magic number" in one_line_data_error(read_idx, tmp_path / "magic")
    (tmp_path / "empty").write_bytes(b"")
    assert "bad magic number" in one_line_data_error(read_idx, tmp_path / "empty")

    packed = gzip.compress(good)
    (tmp_path / "cut.gz").write_bytes(packed[: len(packed) // 2])  # a download cut short
    assert "cannot read IDX file" in one_line_data_error(read_idx, tmp_path / "cut.gz")
    (tmp_path / "plain.gz").write_bytes(good)  # named .gz but not gzipped
    assert "cannot read IDX file" in one_line_data_error(read_idx, tmp_path / "plain.gz")


@pytest.mark.parametrize("gz", [True, False])
def test_find_idx_files_in_a_flat_folder(tmp_path, gz):
    write_image_set(tmp_path, gz=gz, n_train=20, n_test=10)
    found = find_idx_files("mnist", str(tmp_path), download=False)
    assert set(found) == set(IDX_FILES)
    for key, path in found.items():
        assert path.parent == tmp_path and path.name == IDX_FILES[key] + (".gz" if gz else "")


@pytest.mark.parametrize("task, folder", [("fashion-mnist", "FashionMNIST"), ("mnist", "MNIST")])
def test_find_idx_files_in_torchvisions_layout(tmp_path, task, folder):
    write_image_set(tmp_path / folder / "raw", gz=False, n_train=20, n_test=10)
    found = find_idx_files(task, str(tmp_path), download=False)
    assert all(p.parent == tmp_path / folder / "raw" for p in found.values())


def test_missing_idx_files_are_a_one_line_error(tmp_path):
    msg = one_line_data_error(find_idx_files, "mnist", str(tmp_path / "nope"), False)
    assert "no MNIST IDX files" in msg and "download is off" in msg and "--data-dir" in msg
    write_image_set(tmp_path / "partial", n_train=20, n_test=10)
    (tmp_path / "partial" / "t10k-labels-idx1-ubyte.gz").unlink()  # three of four files is not a data set
    assert "no FashionMNIST IDX files" in one_line_data_error(
        find_idx_files, "fashion-mnist", str(tmp_path / "partial"), False)


def test_image_data_splits_and_scales_pixels_to_unit_range(tmp_path):
    write_image_set(tmp_path, gz=True, n_train=60, n_test=30)
    data = task_data("fashion-mnist", tmp_path, 15, seed=0)
    train_images, train_labels = class_images(60, 1)
    test_images, test_labels = class_images(30, 2)

    assert data.train_x.tensors[0].shape == (45, 1, 28, 28) and data.val_x.tensors[0].shape == (15, 1, 28, 28)
    assert data.train_x.tensors[0].dtype == torch.float32 and data.train_y.dtype == torch.int64
    # pixels in [0, 1]: the byte / 255, in training as in the exported graph and on the wire
    assert torch.equal(data.test_x.tensors[0][:, 0], torch.from_numpy(test_images).float() / 255)
    train_x = data.train_x.tensors[0]
    assert train_x.min() >= 0 and train_x.max() <= 1 and train_x.max() > 0.7
    assert torch.equal(data.test_y, torch.from_numpy(test_labels).long())
    assert data.classes[0] == "T-shirt/top" and len(data.classes) == 10

    # training and validation images partition the 60 training images, labels following their image
    both_x = (torch.cat([data.train_x.tensors[0], data.val_x.tensors[0]])[:, 0] * 255).round().to(torch.uint8).numpy()
    both_y = torch.cat([data.train_y, data.val_y]).numpy()
    order = sorted(range(60), key=lambda i: both_x[i].tobytes())
    ref = sorted(range(60), key=lambda i: train_images[i].tobytes())
    assert np.array_equal(both_x[order], train_images[ref])
    assert np.array_equal(both_y[order], train_labels[ref])

    again = task_data("fashion-mnist", tmp_path, 15, seed=0)
    other = task_data("fashion-mnist", tmp_path, 15, seed=1)
    assert torch.equal(again.val_x.tensors[0], data.val_x.tensors[0])
    assert not torch.equal(other.val_x.tensors[0], data.val_x.tensors[0])  # the seed picks the validation images


def test_image_data_rejects_bad_contents(tmp_path):
    write_image_set(tmp_path, gz=False, n_train=20, n_test=10)
    assert "leaves no training samples" in one_line_data_error(task_data, "mnist", tmp_path, 20)

    labels = np.full(10, 12, dtype=np.uint8)  # class 12 of 10
    write_idx(tmp_path / IDX_FILES["test_labels"], labels)
    assert "labels go up to 12" in one_line_data_error(task_data, "mnist", tmp_path, 5)

    write_image_set(tmp_path, gz=False, n_train=20, n_test=10)
    write_idx(tmp_path / IDX_FILES["test_labels"], np.zeros(9, dtype=np.uint8))  # 9 labels for 10 images
    assert "labels for 10 images" in one_line_data_error(task_data, "mnist", tmp_path, 5)

    write_image_set(tmp_path, gz=False, n_train=20, n_test=10)
    write_idx(tmp_path / IDX_FILES["train_images"], np.zeros((20, 32, 32), dtype=np.uint8))
    assert "expected 28x28 uint8" in one_line_data_error(task_data, "mnist", tmp_path, 5)


def test_product_data_is_the_reference_draw():
    data = task_data("product", size=100, val_size=20, test_size=50, test_seed=123)
    train_x, val_x, test_x = (d.tensors[0] for d in (data.train_x, data.val_x, data.test_x))
    assert train_x.shape == (100, 2) and val_x.shape == (20, 2) and test_x.shape == (50, 2)
    for x, y in ((train_x, data.train_y), (val_x, data.val_y), (test_x, data.test_y)):
        assert x.min() >= 1 and x.max() < 10
        assert torch.equal(y, (x[:, 0] * x[:, 1]).unsqueeze(1))
    # the reference: torch.manual_seed(123); X1 = 1 + 9 * rand(n); X2 = 1 + 9 * rand(n)
    g = torch.Generator().manual_seed(123)
    x1, x2 = 1 + 9 * torch.rand(50, generator=g), 1 + 9 * torch.rand(50, generator=g)
    assert torch.equal(data.test_x.tensors[0], torch.stack([x1, x2], 1))
    other = task_data("product", size=100, val_size=20, test_size=50, test_seed=123, seed=1)
    assert torch.equal(other.test_x.tensors[0], test_x) and not torch.equal(other.train_x.tensors[0], train_x)
    # the task's own function, as the trainer calls it: training and validation points are one draw
    splits = product.data(DataOptions(seed=0, size=100, val_size=20, test_size=50))
    assert torch.equal(splits.train[0], data.train_x.tensors[0]) and torch.equal(splits.val[0], data.val_x.tensors[0])
    x, _ = product.points(120, torch.Generator().manual_seed(0))
    assert torch.equal(x, torch.cat([data.train_x.tensors[0], data.val_x.tensors[0]]))


def test_batch_order_is_a_seeded_permutation_per_epoch():
    batches = batch_order(10, 4, epoch=1, seed=0)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))
    assert torch.equal(torch.cat(batch_order(10, 4, 1, 0)), torch.cat(batches))
    assert not torch.equal(torch.cat(batch_order(10, 4, 2, 0)), torch.cat(batches))
    assert not torch.equal(torch.cat(batch_order(10, 4, 1, 5)), torch.cat(batches))
    # two processes: each takes half of every global batch, together all samples
    r0, r1 = batch_order(12, 4, 1, 0, rank=0, world_size=2), batch_order(12, 4, 1, 0, rank=1, world_size=2)
    assert all(len(b) == 2 for b in r0 + r1)
    assert sorted(torch.cat(r0 + r1).tolist()) == list(range(12))


def test_augment_crop_shifts_each_image_and_fills_with_black():
    torch.manual_seed(0)
    x = torch.rand(16, 1, 28, 28) + 1  # every pixel >= 1, so the fill value -5 is easy to spot
    out = Augment(crop_padding=2, hflip=False, pad_value=-5.0)(x)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-5.0)
    shifts = []
    for i in range(16):  # each output is a 28x28 window of its own padded image
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(out[i, 0], padded[i, 0, dy:dy + 28, dx:dx + 28])]
        assert len(matches) == 1
        shifts.append(matches[0])
    assert len({dy for dy, _ in shifts}) > 1 and len({dx for _, dx in shifts}) > 1  # each image its own offset


def test_augment_hflip_flips_about_half():
    torch.manual_seed(0)
    x = torch.rand(200, 1, 28, 28)
    out = Augment(crop_padding=0, hflip=True, pad_value=0.0)(x)
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(200)]
    kept = [torch.equal(out[i], x[i]) for i in range(200)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert 60 < sum(flipped) < 140
    assert not Augment(0, False, 0.0).active and Augment(1, False, 0.0).active


# CI installs Debian's dataset-fashion-mnist (see .ci/run); elsewhere the test runs where it is installed.
debian_fashion = pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir() and os.environ.get("CI") != "true",
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)")


@debian_fashion
@pytest.mark.slow
def test_debian_fashion_mnist_is_found_without_configuration(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/fashion-mnist here: only the Debian folder can answer
    files = find_idx_files("fashion-mnist", "", download=False)
    assert files["train_images"] == DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz"
    data = task_data("fashion-mnist", "", 5000, seed=0)
    assert data.train_x.tensors[0].shape == (55000, 1, 28, 28) and data.test_x.tensors[0].shape == (10000, 1, 28, 28)
    assert data.classes[0] == "T-shirt/top" and set(data.test_y.tolist()) == set(range(10))
    # A few real steps through the CLI path, with no --data-dir.
    cfg, _ = parse_args(["--task", "fashion-mnist", "--epochs", "1", "--run.max_batches", "20", "--out",
                         str(tmp_path / "run"), "--device", "cpu", "--log.tensorboard", "false", "--log.plots", "false"])
    summary = run(cfg)
    assert sum(summary["test"]["per_class"]) > 0 and summary["test"]["accuracy"] > 30  # 20 steps beat chance


@pytest.mark.parametrize("n, world_size", [(10, 1), (1000, 1), (1000, 2), (999, 2), (1001, 4), (3, 8)])
def test_tensor_shard_is_distributed_samplers_shard(n, world_size):
    # The product task's fast path must give exactly the order torch's DistributedSampler gives.
    for epoch in (0, 1, 7):
        for rank in range(world_size):
            assert torch.equal(tensor_shard(n, epoch, 3, rank, world_size), sampler_shard(n, epoch, 3, rank, world_size))
