"""Shared helpers: tiny IDX image sets written on the spot, and ways to run `python -m train`.

Every run here is real training on CPU with tiny data, so the suite takes seconds, not minutes.
Tests run from any working directory: the repository root goes on sys.path (and on PYTHONPATH
for subprocesses), and every run writes under pytest's tmp_path.
"""

import gzip
import importlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import zygote  # noqa: E402

import models  # noqa: E402
import t2d  # noqa: E402
from t2d.idx import IDX_FILES  # noqa: E402
from train.config import build_config  # noqa: E402
from train.data import TaskData, load_task_data  # noqa: E402
from train.main import parse_args, run  # noqa: E402

# One intra-op thread: these models are tiny, and on a shared 2-core machine a second thread spinning
# for its turn made a 1 s CNN run take 13 s (measured). Every run in the suite uses the same setting.
torch.set_num_threads(1)

# Flags that keep an in-process run small: CPU (so results are bit-reproducible), no TensorBoard,
# no PNGs. Tests of those outputs turn them back on.
FAST = ["--device", "cpu", "--log.tensorboard", "false", "--log.plots", "false"]
# Tiny product data: 256 training points (3 batches of 100), 64 validation, 256 test.
PRODUCT = ["--task", "product", "--data.size", "256", "--data.val_size", "64", "--data.test_size", "256"]


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write `array` (uint8) as an IDX file; gzipped when the name ends in .gz."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def class_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n noisy 28x28 uint8 images whose class (0..9) is where a bright 8x5 block sits; balanced labels."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 60, size=(n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        r, col = 3 + 14 * (c // 5), 1 + 5 * (c % 5)  # two rows of five cells
        images[i, r:r + 8, col:col + 5] = rng.integers(180, 256, size=(8, 5))
    return images, labels


def write_image_set(folder: Path, gz: bool = True, n_train: int = 300, n_test: int = 100) -> Path:
    """The four MNIST IDX files, with learnable images, in `folder`."""
    suffix = ".gz" if gz else ""
    (train_x, train_y), (test_x, test_y) = class_images(n_train, 1), class_images(n_test, 2)
    for key, array in (("train_images", train_x), ("train_labels", train_y),
                       ("test_images", test_x), ("test_labels", test_y)):
        write_idx(folder / (IDX_FILES[key] + suffix), array)
    return folder


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    """A folder with the gzipped IDX files (300 training, 100 test images), shared by the session."""
    return write_image_set(tmp_path_factory.mktemp("idx"), gz=True)


def predictor(task: str, arch: str, config: dict | None = None) -> models.Predictor:
    """A fresh Predictor of a built-in task's network (identity normalization)."""
    return models.build_predictor(t2d.builtin_tasks()[task], arch, config)


def task_data(task: str, data_dir: Path | str = "", val_size: int = 200, seed: int = 0, **data) -> TaskData:
    """A task's data as training loads it (CPU, no download): `data` sets further data.* fields."""
    cfg = build_config(task, [{"run": {"seed": seed},
                               "data": {"dir": str(data_dir), "download": False, "val_size": val_size, **data}}])
    return load_task_data(cfg, torch.device("cpu"))


def train(argv: list[str], out: Path, *, fast: bool = True) -> dict:
    """Parse `argv` as `python -m train` would, train in this process, and return the summary."""
    cfg, resume = parse_args([*(FAST if fast else []), "--out", str(out), *argv])
    return run(cfg, resume)


def one_error_line(err: str) -> str:
    """The CLI's whole stderr on bad input: one 'error: ' line, no traceback."""
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def history(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k].double() - b[k].double()).abs().max().item()}"


def cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m train ARGS` in a process of its own (forked from the zygote), run from `cwd` (not the repository)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}  # as torch.set_num_threads(1) above
    return zygote.run(["-m", "train", *args], cwd, env, timeout)


# A user's 3-class task whose splits record every sample read; FORBID_TEST = True makes any read of
# the test split raise. Tests of what reads the test split (calibration, run.test false) use it.
USER_TASK = '''
import torch
from models import MLP, MLPConfig
from t2d import Input, Model, Output, Splits, Task

ACCESS = []  # (split, index) of every sample read, in order

class Recorded(torch.utils.data.Dataset):
    def __init__(self, name, x, y, forbidden=False):
        self.name, self.x, self.y, self.forbidden = name, x, y, forbidden
    def __len__(self):
        if self.forbidden:
            raise RuntimeError(f"the {self.name} split was touched")
        return len(self.x)
    def __getitem__(self, i):
        if self.forbidden:
            raise RuntimeError(f"the {self.name} split was touched")
        ACCESS.append((self.name, int(i)))
        return self.x[i], self.y[i]

FORBID_TEST = False

def data(opts):
    g = torch.Generator().manual_seed(0)
    def draw(n):
        y = torch.randint(0, 3, (n,), generator=g)
        x = torch.randn(n, 6, generator=g) * 0.3 + torch.nn.functional.one_hot(y, 6).float() * 2
        return x, y
    train, test = draw(400), draw(150)
    return Splits(train=Recorded("train", *train), test=Recorded("test", *test, forbidden=FORBID_TEST))

TASK = Task(name="recorded", kind="classification", input=Input("features", (6,)), output=Output("scores", 3),
            classes=("a", "b", "c"), data=data, models={"mlp": Model(MLPConfig, lambda c, t: MLP(c, (6,), 3))},
            defaults={"run": {"epochs": 3}, "data": {"batch_size": 32, "val_size": 50}})
'''


@pytest.fixture
def user_task(tmp_path, monkeypatch):
    (tmp_path / "recorded_task.py").write_text(USER_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("recorded_task", None)  # each test its own module, and so its own ACCESS list
    recorded_task = importlib.import_module("recorded_task")  # written above, into tmp_path: not a dependency

    yield recorded_task
    sys.modules.pop("recorded_task", None)


# pytest-xdist (`--dist loadfile`) hands each worker whole modules, by default the modules with the most
# tests first, which left the five long tests of test_scripts.py to run alone at the end. Longest-running
# first instead (measured CPU seconds a module, most first; the rest keep their order after these), so the
# two workers finish together.
LONGEST_FIRST = ["test_quantize.py", "test_reference.py", "test_serve_reliability.py", "test_docs.py",
                 "test_scripts.py", "test_distributed.py", "test_export.py", "test_checkpoint_safety.py",
                 "test_signatures.py", "test_ui.py", "test_openapi.py", "test_serve_v2.py", "test_resnet.py",
                 "test_serve_quantized.py", "test_serve.py", "test_task.py", "test_task_serve.py"]


def by_module(config) -> bool:
    """Whether xdist hands out whole modules (the README's command); other runs keep pytest's order, which under
    plain `-n auto` splits fewer modules' shared fixtures across the workers. A worker's own options say "no
    distribution", so the controller tells it (pytest_configure_node)."""
    if hasattr(config, "workerinput"):
        return config.workerinput.get("t2d_by_module", False)
    return getattr(config.option, "dist", "no") == "loadfile"


def pytest_configure(config):
    if by_module(config):
        config.option.loadscopereorder = False  # keep the order below


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    node.workerinput["t2d_by_module"] = by_module(node.config)


def pytest_collection_modifyitems(config, items):
    if by_module(config):
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's own order is kept
