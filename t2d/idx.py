"""MNIST-style image sets: the four IDX files (gzipped or not) from a folder, else torchvision's download."""

import gzip
import socket
import struct
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from t2d.errors import DataError

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


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


def images_and_labels(images: Path, labels: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 1, 28, 28) float32 pixels in [0, 1] (the raw units served over v2) and (N,) int64 labels."""
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8:
        raise DataError(f"{images} holds {x.dtype} images of shape {x.shape[1:]}, expected 28x28 uint8")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{labels} holds {y.shape} labels for {len(x)} images in {images}")
    # astype copies into a writable array: torch.from_numpy of the read-only file buffer warns on every run
    pixels = torch.from_numpy(x.astype(np.float32)).unsqueeze(1).div_(255.0)
    return pixels, torch.from_numpy(y.astype(np.int64))


def find_idx_files(folders: list[Path], download_to: Path | None, torchvision_name: str) -> dict[str, Path] | None:
    """The four IDX files from the first of `folders` that has them all, else from torchvision's
    download into `download_to` (None: no download); None if neither works."""
    for folder in folders:
        if found := _idx_files_in(folder):
            return found
    if download_to is not None:
        _download(torchvision_name, download_to)
        return _idx_files_in(download_to / torchvision_name / "raw")
    return None


def _idx_files_in(folder: Path) -> dict[str, Path] | None:
    found = {}
    for key, name in IDX_FILES.items():
        path = next((p for p in (folder / name, folder / f"{name}.gz") if p.is_file()), None)
        if path is None:
            return None
        found[key] = path
    return found


def _download(torchvision_name: str, root: Path) -> None:
    """torchvision's downloader; any failure (no network, bad mirror) just means 'not downloaded'."""
    import torchvision.datasets  # slow to import; only needed here

    dataset_cls = getattr(torchvision.datasets, torchvision_name)
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
