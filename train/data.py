"""Data for the built-in tasks, as whole tensors kept on the training device.

product: synthetic (X1, X2) uniform in [1, 10), Y = X1*X2. Training and validation points come from
one draw seeded by `run.seed`, split by position; the test set is drawn exactly as the reference
script draws it (10,000 points, seed 123), so test errors compare one to one.

mnist / fashion-mnist: IDX files (gzipped or not) read from a folder; torchvision downloads them
where the network allows. Validation images are held out of the 60,000 training images.
Datasets this small fit on any device, so there is no per-sample DataLoader work: batches are
index gathers on resident tensors.
"""

import gzip
import socket
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.product import INPUT_RANGE
from train.config import Config

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# torchvision's dataset class and folder name, and the classes' names, per task.
IMAGE_TASKS = {
    "mnist": ("MNIST", [str(d) for d in range(10)]),
    "fashion-mnist": ("FashionMNIST", ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                       "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]),
}
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DataError(Exception):
    """Data that is missing or malformed; the message is one line that says what to do."""


@dataclass
class TaskData:
    """Raw-unit tensors on the training device. x: (N, 2) floats or (N, 1, 28, 28) pixels in 0..255;
    y: (N, 1) products or (N,) class indices."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str] | None = None  # None for regression


def load_task_data(cfg: Config, device: torch.device) -> TaskData:
    if cfg.run.task == "product":
        data = product_data(cfg.data.size, cfg.data.val_size, cfg.data.test_size, cfg.run.seed, cfg.data.test_seed)
    else:
        data = image_data(cfg.run.task, cfg.data.dir, cfg.data.download, cfg.data.val_size, cfg.run.seed)
    return TaskData(*(t.to(device) for t in (data.train_x, data.train_y, data.val_x, data.val_y,
                                              data.test_x, data.test_y)), classes=data.classes)


def product_points(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n points as the reference draws them: all X1, then all X2, uniform in [1, 10)."""
    low, high = INPUT_RANGE
    x1 = low + (high - low) * torch.rand(n, generator=generator)
    x2 = low + (high - low) * torch.rand(n, generator=generator)
    return torch.stack([x1, x2], 1), (x1 * x2).unsqueeze(1)  # (n, 2), (n, 1)


def product_data(size: int, val_size: int, test_size: int, seed: int, test_seed: int) -> TaskData:
    x, y = product_points(size + val_size, torch.Generator().manual_seed(seed))
    test_x, test_y = product_points(test_size, torch.Generator().manual_seed(test_seed))
    return TaskData(x[:size], y[:size], x[size:], y[size:], test_x, test_y)


def image_data(task: str, data_dir: str, download: bool, val_size: int, seed: int) -> TaskData:
    files = find_idx_files(task, data_dir, download)
    train_x, train_y = _images_and_labels(files["train_images"], files["train_labels"])
    test_x, test_y = _images_and_labels(files["test_images"], files["test_labels"])
    if val_size >= len(train_x):
        raise DataError(f"data.val_size={val_size} leaves no training images (there are {len(train_x)})")
    perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size], perm[val_size:].sort().values
    classes = IMAGE_TASKS[task][1]
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    if n_classes > len(classes):
        raise DataError(f"labels go up to {n_classes - 1}, but {task} has {len(classes)} classes")
    return TaskData(train_x[train_idx], train_y[train_idx], train_x[val_idx], train_y[val_idx],
                    test_x, test_y, classes=classes)


def _images_and_labels(images: Path, labels: Path) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8:
        raise DataError(f"{images} holds {x.dtype} images of shape {x.shape[1:]}, expected 28x28 uint8")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{labels} holds {y.shape} labels for {len(x)} images in {images}")
    # (N, 28, 28) uint8 -> (N, 1, 28, 28) float pixels in 0..255: the raw units served over HTTP.
    return torch.from_numpy(x.astype(np.float32)).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (the MNIST format), gzipped or not."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    count = int(np.prod(dims)) if dims else 1
    if len(raw) - header != count * dtype.itemsize:
        raise DataError(f"{path} is truncated or padded: header says {dims}, file has {len(raw) - header} data bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def default_data_dir(task: str) -> Path:
    return Path("data") / task


def find_idx_files(task: str, data_dir: str, download: bool) -> dict[str, Path]:
    """The four IDX files for `task`, looked up in `data_dir` (or its defaults), else downloaded."""
    tv_name = IMAGE_TASKS[task][0]
    root = Path(data_dir) if data_dir else default_data_dir(task)
    candidates = [root, root / tv_name / "raw"]
    if not data_dir and task == "fashion-mnist":
        candidates.append(DEBIAN_FASHION_MNIST)
    for folder in candidates:
        if found := _idx_files_in(folder):
            return found
    if download:
        _download(task, root)
        if found := _idx_files_in(root / tv_name / "raw"):
            return found
    where = f"{root}" + (f" or {DEBIAN_FASHION_MNIST}" if len(candidates) > 2 else "")
    hint = " (or apt-get install dataset-fashion-mnist)" if task == "fashion-mnist" else ""
    raise DataError(
        f"no {tv_name} IDX files in {where} and {'download failed' if download else 'download is off'}: "
        f"put {', '.join(n + '.gz' for n in IDX_FILES.values())} in {root} or pass --data-dir{hint}"
    )


def _idx_files_in(folder: Path) -> dict[str, Path] | None:
    found = {}
    for key, name in IDX_FILES.items():
        path = next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)
        if path is None:
            return None
        found[key] = path
    return found


def _download(task: str, root: Path) -> None:
    """torchvision's downloader; any failure (no network, bad mirror) just means 'not downloaded'."""
    import torchvision.datasets  # slow to import; only needed here

    dataset_cls = getattr(torchvision.datasets, IMAGE_TASKS[task][0])
    try:
        with _socket_timeout(30):  # a network that silently drops packets must not hang the run
            dataset_cls(str(root), train=True, download=True)
            dataset_cls(str(root), train=False, download=True)
    except Exception:
        pass


@contextmanager
def _socket_timeout(seconds: float):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def batch_order(n: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1,
                device: torch.device | str = "cpu", sampler: bool = True) -> list[torch.Tensor]:
    """This process's shuffled batches of indices into a training set of `n` samples.

    The order is torch's DistributedSampler's: every process of a torchrun job gets its own shard of
    one permutation seeded by (seed, epoch); one process gets the whole permutation. `batch_size`
    is the global batch: each process takes batch_size / world_size of it, so one step of the job
    sees the same samples whatever the number of processes. `sampler=False` computes the same
    order with tensor ops, for the product task, whose 15 ms epochs can't afford the sampler's
    Python list (1 ms an epoch, measured).
    """
    shard = sampler_shard if sampler else tensor_shard
    order = shard(n, epoch, seed, rank, world_size).to(device)
    return list(order.split(batch_size // world_size))


def sampler_shard(n: int, epoch: int, seed: int, rank: int, world_size: int) -> torch.Tensor:
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler))


def tensor_shard(n: int, epoch: int, seed: int, rank: int, world_size: int) -> torch.Tensor:
    """DistributedSampler's shard, computed without a Python list (tests hold the two equal)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    padding = -n % world_size  # pad by repeating the head so every process gets as many samples
    if padding:
        perm = torch.cat([perm, perm.repeat(padding // n + 1)[:padding]])
    return perm[rank::world_size]


class Augment:
    """Random crop (zero-padded) and horizontal flip on a standardized image batch, on its device."""

    def __init__(self, crop_padding: int, hflip: bool, pad_value: float):
        self.pad, self.hflip, self.pad_value = crop_padding, hflip, pad_value

    @property
    def active(self) -> bool:
        return self.pad > 0 or self.hflip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape  # (B, 1, 28, 28)
        if self.pad > 0:
            p = self.pad
            padded = torch.nn.functional.pad(x, (p, p, p, p), value=self.pad_value)
            dy = torch.randint(0, 2 * p + 1, (b, 1, 1), device=x.device)
            dx = torch.randint(0, 2 * p + 1, (b, 1, 1), device=x.device)
            rows = (torch.arange(h, device=x.device).view(1, h, 1) + dy).expand(b, h, w)
            cols = (torch.arange(w, device=x.device).view(1, 1, w) + dx).expand(b, h, w)
            batch = torch.arange(b, device=x.device).view(b, 1, 1).expand(b, h, w)
            x = padded[batch, 0, rows, cols].unsqueeze(1)  # one gather: each image its own offset
        if self.hflip:
            flip = torch.rand(b, 1, 1, 1, device=x.device) < 0.5
            x = torch.where(flip, x.flip(-1), x)
        return x
