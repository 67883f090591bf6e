"""The public task API (t2d): a user's own task trains, resumes and exports with no edit to the toolkit.

    python -m pytest tests/test_task.py -q            # the in-process checks; -m slow adds the real CLI runs

What is checked:
- a task declared in a Python file outside the repository runs through the real `python -m train` and
  `python -m export` from that file's folder: regression on 6 features, and 3 classes of 8x8 images with
  the toolkit's CNN; --resume and export without --task stop with one line naming the --task to pass;
- every way `--task` can be wrong is one line and exit 2, never a traceback; t2d.Task refuses a bad
  declaration; a task's data or network that disagrees with its declaration is a one-line error;
- normalization follows Input.normalize and uses the training split only;
- train, export and models never compare task names.
"""

import json
import math
import re
import sys
import types
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import FAST, REPO, cli, one_error_line
from serving import export_cli
from torch import nn

import export.main
import models
import t2d
from models.checkpoint import load_checkpoint
from t2d import DataError, Input, Model, Output, Splits, Task
from train.main import main as train_main

# --- a user's task file, as a user writes it ------------------------------------------------------

USER_TASKS = '''
"""A user's own tasks, outside the toolkit: a regression on 6 features, 3 classes of 8x8 images."""
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from models import CNN, CNNConfig
from t2d import Input, Model, Output, Splits, Task

W = torch.tensor([[1.0], [-2.0], [0.5], [3.0], [0.0], [1.5]])


def reg_data(opts):
    g = torch.Generator().manual_seed(1234)  # the same data whatever the run's seed
    x = torch.randn(600, 6, generator=g) * 2 + 5
    y = x @ W + 0.01 * torch.randn(600, 1, generator=g)
    return Splits(train=(x[:400], y[:400]), val=(x[400:500], y[400:500]), test=(x[500:], y[500:]))


@dataclass
class NetConfig:
    hidden: list[int] = field(default_factory=lambda: [16])


def build_net(cfg, task):
    layers, width = [], task.input.shape[0]
    for h in cfg.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, task.output.size))  # (B, 6) -> (B, 1)


REG = Task(name="six-features", kind="regression", input=Input("features", (6,)), output=Output("target", 1),
           data=reg_data, models={"net": Model(NetConfig, build_net)},
           defaults={"run": {"epochs": 3}, "data": {"batch_size": 50}, "optim": {"lr": 0.01}})


def img_data(opts):
    g = torch.Generator().manual_seed(99)
    y = torch.arange(300) % 3
    x = torch.rand(300, 1, 8, 8, generator=g) * 0.2  # dark noise; the class is where two bright columns are
    for c in range(3):
        x[y == c, 0, :, 3 * c:3 * c + 2] += 0.8
    return Splits(train=(x[:240], y[:240]), test=(x[240:], y[240:]))  # validation: held out by the trainer


IMG = Task(name="tiny-images", kind="classification",
           input=Input("image", (1, 8, 8), range=(0.0, 1.0), normalize="global"),
           output=Output("logits", 3), classes=("left", "middle", "right"), data=img_data,
           models={"cnn": Model(CNNConfig, lambda cfg, task: CNN(cfg, task.input.shape, task.output.size))},
           defaults={"run": {"epochs": 3}, "data": {"batch_size": 30, "val_size": 30},
                     "model": {"channels": [4, 8, 8]}, "optim": {"lr": 0.01}})

HELPER = 42


def make():  # a factory: --task never calls what it names
    Path("factory_was_called").write_text("yes")
    return REG


LOOKALIKE = Task(name="mnist", kind="regression", input=Input("x", (6,)), output=Output("y", 1), data=reg_data,
                 models={"net": Model(NetConfig, build_net)})
'''
BROKEN_IMPORT = 'raise RuntimeError("database unreachable\\nsecond line of the message")\n'
NEEDS_MISSING = "import not_installed_package_xyz  # noqa\n"


def write_user_tasks(folder: Path, prefix: str = "") -> dict[str, str]:
    """The user's files in `folder`; module names start with `prefix` (unique per in-process test: a module
    imported once stays in sys.modules). Returns the module names."""
    names = {"tasks": f"{prefix}mytask", "broken": f"{prefix}broken_import", "missing": f"{prefix}needs_missing"}
    for key, text in (("tasks", USER_TASKS), ("broken", BROKEN_IMPORT), ("missing", NEEDS_MISSING)):
        (folder / f"{names[key]}.py").write_text(text)
    return names


def bad_task_refs(m: dict[str, str]) -> dict[str, tuple[str, str]]:
    """--task value -> what its one error line must say."""
    tasks = m["tasks"]
    return {
        "unknown name": ("cifar", "unknown task 'cifar'; --task takes product, mnist, fashion-mnist or module:ATTRIBUTE"),
        "empty module": (":REG", "unknown task ':REG'"),
        "missing module": ("no_such_module_here:TASK",
                           "--task no_such_module_here:TASK: no module 'no_such_module_here' on the path"),
        "module raises": (f"{m['broken']}:TASK",
                          f"importing {m['broken']} failed: RuntimeError: database unreachable"),
        "module's import missing": (f"{m['missing']}:TASK",
                                    f"importing {m['missing']} failed: No module named 'not_installed_package_xyz'"),
        "missing attribute": (f"{tasks}:NOPE", f"module {tasks} has no attribute 'NOPE'"),
        "not a Task": (f"{tasks}:HELPER", f"--task {tasks}:HELPER is a int, not a t2d.Task"),
        "factory": (f"{tasks}:make", f"--task {tasks}:make is a function, not a t2d.Task"),
        "built-in name": (f"{tasks}:LOOKALIKE", "is named 'mnist', a built-in task's name; give it another name"),
    }


# --- the real CLI, from the user's folder ----------------------------------------------------------

@pytest.fixture(scope="module")
def user_cli(tmp_path_factory):
    """Every CLI run of the user's tasks, from their folder: train both, then the refusals and exports
    side by side, then the resume that changes the run folder. name -> CompletedProcess."""
    home = tmp_path_factory.mktemp("user")
    write_user_tasks(home)
    done = {}
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = {"train reg": pool.submit(cli, [*FAST, "--task", "mytask:REG", "--out", "runs/reg"], home),
                "train img": pool.submit(cli, [*FAST, "--task", "mytask:IMG", "--out", "runs/img"], home)}
        done.update({k: j.result() for k, j in jobs.items()})
        # as the first runs left them (the resume below rewrites runs/reg)
        for run in ("reg", "img"):
            if (home / "runs" / run / "summary.json").is_file():
                done[f"summary {run}"] = json.loads((home / "runs" / run / "summary.json").read_text())
                done[f"best {run}"] = torch.load(home / "runs" / run / "best.pt", weights_only=True)
        jobs = {
            "resume without --task": pool.submit(cli, [*FAST, "--resume", "runs/reg/last.pt", "--epochs", "5"], home),
            "export reg": pool.submit(export_cli, ["--task", "mytask:REG", "--checkpoint", "runs/reg/best.pt",
                                                   "--out", "exports/reg", "--no-register"], home / "bentoml", home),
            "export without --task": pool.submit(export_cli, ["--checkpoint", "runs/reg/best.pt", "--out",
                                                              "exports/none", "--no-register"], home / "bentoml", home),
            "export another task": pool.submit(export_cli, ["--task", "mytask:IMG", "--checkpoint", "runs/reg/best.pt",
                                                            "--out", "exports/other", "--no-register"],
                                               home / "bentoml", home),
            "export img": pool.submit(export_cli, ["--task", "mytask:IMG", "--checkpoint", "runs/img/best.pt",
                                                   "--out", "exports/img", "--no-register"], home / "bentoml", home),
            **{f"bad {name}": pool.submit(cli, [*FAST, "--task", ref, "--out", "runs/bad"], home)
               for name, (ref, _) in bad_task_refs(write_user_tasks(home)).items()},
        }
        done.update({k: j.result() for k, j in jobs.items()})
        done["resume with --task"] = cli([*FAST, "--task", "mytask:REG", "--resume", "runs/reg/last.pt",
                                          "--epochs", "5"], home)
    return home, done


@pytest.mark.slow
def test_user_task_trains_from_its_own_folder(user_cli):
    home, done = user_cli
    for name, run, task, kind in (("train reg", "reg", "six-features", "regression"),
                                  ("train img", "img", "tiny-images", "classification")):
        assert done[name].returncode == 0, done[name].stderr[-3000:]
        summary = done[f"summary {run}"]
        assert summary["task"] == task and summary["epochs_run"] == 3
        ckpt = done[f"best {run}"]
        ref = {"reg": "mytask:REG", "img": "mytask:IMG"}[run]
        assert (ckpt["task"], ckpt["task_ref"], ckpt["kind"]) == (task, ref, kind)
        assert ckpt["config"]["run"]["task"] == ref
    reg, img = done["summary reg"], done["summary img"]
    assert reg["test"]["mre"] < 20, reg["test"]  # learned something: y is linear in x
    assert img["test"]["accuracy"] >= 90, img["test"] and img["arch"] == "cnn"  # chance: 33%
    assert not (home / "factory_was_called").exists()  # --task mytask:make named the factory; it never ran


@pytest.mark.slow
def test_user_task_resume_needs_its_task(user_cli):
    home, done = user_cli
    refused = done["resume without --task"]
    assert refused.returncode == 2
    line = one_error_line(refused.stderr)
    assert "runs/reg/last.pt was trained on task six-features, not a built-in one; pass --task mytask:REG" in line
    resumed = done["resume with --task"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((home / "runs" / "reg" / "summary.json").read_text())
    assert summary["epochs_run"] == 5 and torch.load(home / "runs" / "reg" / "last.pt", weights_only=True)["epoch"] == 5
    assert [json.loads(r)["epoch"] for r in (home / "runs" / "reg" / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2, 3, 4, 5]


@pytest.mark.slow
@pytest.mark.parametrize("run", ["reg", "img"])
def test_user_task_exports_with_parity(user_cli, run):
    home, done = user_cli
    result = done[f"export {run}"]
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((home / "exports" / run / "parity.json").read_text())
    assert report["passed"] and report["batch_sizes"] == [1, 7, 1024]
    assert {(c["format"], c["batch"]) for c in report["checks"]} == {
        (f, b) for f in ("onnx", "torchscript") for b in (1, 7, 1024)}
    task = {"reg": "six-features", "img": "tiny-images"}[run]
    assert report["inputs"].startswith(f"first {100 if run == 'reg' else 60} test inputs of task {task}")
    contract = json.loads(export_contract(home / "exports" / run / "model.onnx"))
    assert contract["task"] == task
    if run == "reg":
        assert contract["inputs"][0]["name"] == "features" and contract["inputs"][0]["shape"] == ["batch", 6]
        assert contract["outputs"][0] == {"name": "target", "dtype": "float32", "shape": ["batch", 1],
                                          "description": ""}
    else:
        assert contract["inputs"][0]["shape"] == ["batch", 1, 8, 8] and contract["inputs"][0]["range"] == [0, 1]
        assert contract["classes"] == ["left", "middle", "right"]


def export_contract(path: Path) -> str:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}["contract"]


@pytest.mark.slow
def test_user_task_export_needs_the_right_task(user_cli):
    home, done = user_cli
    for name, expected in (("export without --task", "runs/reg/best.pt was trained on task six-features, which is "
                                                      "not built in; pass --task mytask:REG"),
                           ("export another task", "--task mytask:IMG is task tiny-images; runs/reg/best.pt was "
                                                   "trained on task six-features")):
        assert done[name].returncode == 2, done[name].stderr
        assert expected in one_error_line(done[name].stderr), name
    assert not (home / "exports" / "none").exists() and not (home / "exports" / "other").exists()


@pytest.mark.slow
def test_bad_task_refs_from_the_command_line(user_cli):
    home, done = user_cli
    for name, (ref, expected) in bad_task_refs(write_user_tasks(home)).items():
        result = done[f"bad {name}"]
        assert result.returncode == 2, (name, result.stderr)
        line = one_error_line(result.stderr)
        assert expected in line, (name, line)
        assert "second line" not in line
    assert not (home / "runs" / "bad").exists()


# --- the same in this process (fast) ---------------------------------------------------------------

@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    """The user's files in tmp_path, on sys.path, under module names of their own."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)  # the factory would write its marker here
    return write_user_tasks(tmp_path, prefix=f"u{uuid.uuid4().hex[:10]}_")


@pytest.mark.parametrize("case", list(bad_task_refs({"tasks": "m", "broken": "b", "missing": "n"})))
def test_bad_task_ref_is_one_line(user_modules, tmp_path, capsys, case):
    ref, expected = bad_task_refs(user_modules)[case]
    assert train_main([*FAST, "--task", ref, "--out", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert expected in line and "second line" not in line, line
    assert not (tmp_path / "run").exists() and not (tmp_path / "factory_was_called").exists()
    with pytest.raises(t2d.TaskError, match=re.escape(expected)):  # the same from the public API
        t2d.resolve(ref)


def test_user_task_in_process_trains_resumes_and_exports(user_modules, tmp_path, capsys):
    ref = f"{user_modules['tasks']}:REG"
    task = t2d.resolve(ref)
    assert task.name == "six-features" and not t2d.is_builtin(task) and t2d.resolve(ref) is task
    assert train_main([*FAST, "--task", ref, "--out", str(tmp_path / "run")]) == 0
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")  # not built in: loaded, checked only once a task is given
    assert ckpt["task_ref"] == ref and ckpt["model_config"] == {"hidden": [16]}
    load_checkpoint(tmp_path / "run" / "last.pt", task=task)
    capsys.readouterr()
    assert train_main([*FAST, "--resume", str(tmp_path / "run" / "last.pt"), "--epochs", "4"]) == 2
    assert f"pass --task {ref}" in one_error_line(capsys.readouterr().err)
    assert train_main([*FAST, "--task", "product", "--resume", str(tmp_path / "run" / "last.pt"), "--epochs", "4"]) == 2
    assert "--task product does not match the checkpoint's task six-features" in one_error_line(
        capsys.readouterr().err)
    assert train_main([*FAST, "--task", ref, "--resume", str(tmp_path / "run" / "last.pt"), "--epochs", "4"]) == 0
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 4
    capsys.readouterr()
    best = str(tmp_path / "run" / "best.pt")
    assert export.main.main(["--checkpoint", best, "--out", str(tmp_path / "none"), "--no-register"]) == 2
    assert f"pass --task {ref} " in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "none").exists()
    assert export.main.main(["--task", f"{user_modules['tasks']}:IMG", "--checkpoint", best, "--out",
                             str(tmp_path / "other"), "--no-register"]) == 2
    assert "is task tiny-images" in one_error_line(capsys.readouterr().err)
    assert export.main.main(["--task", ref, "--checkpoint", best, "--out", str(tmp_path / "export"),
                             "--no-register"]) == 0
    report = json.loads((tmp_path / "export" / "parity.json").read_text())
    assert report["passed"] and report["batch_sizes"] == [1, 7, 1024]


class SizedByValues(nn.Module):
    """A user's network whose __init__ computes with tensor values (.item()): impossible on the meta device,
    where checkpoint validation builds networks first."""

    def __init__(self, cfg, task):
        super().__init__()
        width = int(torch.tensor(task.input.shape).prod().item())
        self.linear = nn.Linear(width, task.output.size)

    def forward(self, x):
        return self.linear(x.flatten(1))


def test_network_built_from_tensor_values_resumes_and_exports(monkeypatch, tmp_path, capsys):
    task = task_of(data=lambda opts: splits_with(*synthetic()), models={"net": Model(NetConfig, SizedByValues)})
    ref = f"{register(monkeypatch, TASK=task)}:TASK"
    assert train_main([*FAST, "--task", ref, "--out", str(tmp_path / "run"), "--epochs", "1"]) == 0
    assert train_main([*FAST, "--task", ref, "--resume", str(tmp_path / "run" / "last.pt"), "--epochs", "2"]) == 0
    assert export.main.main(["--task", ref, "--checkpoint", str(tmp_path / "run" / "best.pt"), "--out",
                             str(tmp_path / "export"), "--no-register", "--batch-sizes", "1,3"]) == 0, \
        capsys.readouterr().err


# --- t2d.Task refuses a bad declaration -------------------------------------------------------------

@dataclass
class NetConfig:
    hidden: list[int] = field(default_factory=lambda: [8])


def linear_net(cfg: NetConfig, task: Task) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(task.input.shape), task.output.size))


def task_of(**fields) -> Task:
    values = dict(name="mine", kind="regression", input=Input("x", (6,)), output=Output("y", 1),
                  data=lambda opts: None, models={"net": Model(NetConfig, linear_net)})
    values.update(fields)
    return Task(**values)


@pytest.mark.parametrize("make, message", [
    (lambda: task_of(kind="ranking"), "Task.kind must be one of regression, classification, got 'ranking'"),
    (lambda: task_of(kind="classification", output=Output("logits", 3), classes=("a", "b")),
     "one class name per output"),
    (lambda: task_of(kind="classification", output=Output("logits", 3)), "one class name per output"),
    (lambda: task_of(kind="classification", output=Output("logits", 1), classes=("a",)), "Output.size >= 2"),
    (lambda: task_of(classes=("a",)), "a regression Task has no classes"),
    (lambda: task_of(default_model="cnn"), "Task.default_model 'cnn' is not one of ['net']"),
    (lambda: task_of(models={}), "Task.models must name at least one Model"),
    (lambda: task_of(name="My Task"), "Task.name must be lowercase"),
    (lambda: Input("x", ()), "Input.shape must be positive sizes"),
    (lambda: Input("x", (6, 0)), "Input.shape must be positive sizes"),
    (lambda: Input("x", (6,), normalize="zscore"), "Input.normalize must be one of feature, global, none"),
    (lambda: Input("x", (6,), dtype="float64"), "Input.dtype must be one of float32"),
    (lambda: Input("x", (6,), range=(1.0, 0.0)), "Input.range must be (low, high)"),
    (lambda: Input("my input", (6,)), "Input.name must be an identifier"),
    (lambda: Input("image", (1, 8, 8), train_range=((0.0, 1.0),)), "Input.train_range needs a vector input"),
    (lambda: Input("x", (2,), train_range=((0.0, 1.0),)), "one (low, high) per feature"),
    (lambda: Output("y", 0), "Output.size must be >= 1"),
])
def test_bad_declaration_is_a_value_error(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_builtin_tasks_are_tasks_of_the_public_api():
    tasks = t2d.builtin_tasks()
    assert list(tasks) == ["product", "mnist", "fashion-mnist"]
    for name, task in tasks.items():
        assert isinstance(task, Task) and task.name == name and t2d.is_builtin(task) and t2d.resolve(name) is task
    assert not t2d.is_builtin(task_of(name="product"))  # a lookalike is not the built-in
    assert tasks["product"].regression and tasks["product"].input.shape == (2,) and tasks["product"].arch == "product_mlp"
    assert tasks["mnist"].classes == tuple(map(str, range(10))) and tasks["mnist"].arch == "mlp"
    assert tasks["fashion-mnist"].input.range == (0.0, 1.0) and tasks["fashion-mnist"].monitors == ("loss", "accuracy")


# --- a task's data and network must agree with its declaration --------------------------------------

def register(monkeypatch, **tasks: Task) -> str:
    """`tasks` as attributes of a fresh module in sys.modules; returns its name, for --task NAME:ATTRIBUTE."""
    name = f"tasks_{uuid.uuid4().hex[:10]}"
    module = types.ModuleType(name)
    for attr, task in tasks.items():
        setattr(module, attr, task)
    monkeypatch.setitem(sys.modules, name, module)
    return name


def synthetic(n: int = 120, features: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    return x, x.sum(1, keepdim=True)


def splits_with(x: torch.Tensor, y: torch.Tensor) -> Splits:
    return Splits(train=(x[:80], y[:80]), val=(x[80:100], y[80:100]), test=(x[100:], y[100:]))


def nan_inputs(opts):
    x, y = synthetic()
    x[5, 2] = float("nan")
    return splits_with(x, y)


def labels_out_of_range(opts):
    x, _ = synthetic()
    return splits_with(x, torch.arange(120) % 4)  # classes 0..3 for a task of 3


def own_data_error(opts):
    raise DataError("no rows in sales.csv: export them from the database first")


BAD_DATA = {
    "wrong input shape": (task_of(data=lambda opts: splits_with(*synthetic(features=5))),
                          "task mine's train split has inputs of shape [5]; the task's input x is [6]"),
    "wrong number of targets": (task_of(data=lambda opts: splits_with(synthetic()[0], torch.zeros(120, 2))),
                                "task mine's train split has 2 target value(s) per sample; the task's output y has 1"),
    "labels out of range": (task_of(kind="classification", output=Output("logits", 3), classes=("a", "b", "c"),
                                    data=labels_out_of_range),
                            "task mine's train split has labels from 0 to 3; the task has 3 classes (0 to 2)"),
    "NaN inputs": (task_of(data=nan_inputs), "task mine's train split has inputs that are NaN or infinite"),
    "fewer targets than inputs": (task_of(data=lambda opts: Splits(train=(synthetic()[0], synthetic()[1][:50]),
                                                                   test=synthetic())),
                                  "task mine's train split has 120 inputs and 50 targets"),
    "not tensors": (task_of(data=lambda opts: Splits(train="sales.csv", test=synthetic())),
                    "must be an (x, y) pair of tensors or a Dataset of (x, y), got str"),
    "the task's own DataError": (task_of(data=own_data_error), "no rows in sales.csv"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_data_that_disagrees_with_the_task_is_one_line(monkeypatch, tmp_path, capsys, case):
    task, expected = BAD_DATA[case]
    module = register(monkeypatch, TASK=task)
    assert train_main([*FAST, "--task", f"{module}:TASK", "--out", str(tmp_path / "run"), "--epochs", "1"]) == 2
    assert expected in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


class Squeezed(nn.Module):
    """A regression net that returns (B,) where the task's targets are (B, 1)."""

    def __init__(self, cfg, task):
        super().__init__()
        self.linear = nn.Linear(task.input.shape[0], 1)

    def forward(self, x):
        return self.linear(x)[:, 0]  # (B, 6) -> (B,): MSE against (B, 1) would broadcast to (B, B)


@pytest.mark.parametrize("task, expected", [
    (task_of(data=lambda opts: splits_with(*synthetic()), models={"net": Model(NetConfig, Squeezed)}),
     "task mine's network net maps a batch of 2 inputs to shape [2]; its Output y needs [2, 1]"),
    (task_of(kind="classification", output=Output("logits", 3), classes=("a", "b", "c"),
             data=lambda opts: splits_with(synthetic()[0], torch.arange(120) % 3),
             models={"net": Model(NetConfig, lambda cfg, task: nn.Linear(6, 4))}),
     "maps a batch of 2 inputs to shape [2, 4]; its Output logits needs [2, 3]"),
])
def test_network_that_disagrees_with_the_output_is_one_line(monkeypatch, tmp_path, capsys, task, expected):
    module = register(monkeypatch, TASK=task)
    assert train_main([*FAST, "--task", f"{module}:TASK", "--out", str(tmp_path / "run"), "--epochs", "1"]) == 2
    assert expected in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


# --- normalization follows Input.normalize, fitted on the training split only ------------------------

def spread_data(opts):
    """Features with their own offsets and scales; validation and test far off, so using them would show."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(200, 6, generator=g) * torch.tensor([1.0, 2, 3, 4, 5, 6]) + torch.tensor([0.0, 10, -5, 3, 100, 1])
    y = x[:, :1] * 2 + x[:, 1:2]
    return Splits(train=(x[:100], y[:100]), val=(x[100:150] + 50, y[100:150] + 50), test=(x[150:] - 50, y[150:]))


def channel_data(opts):
    """3-channel 8x8 images, each channel around its own level; validation all 1, test all 0."""
    g = torch.Generator().manual_seed(8)
    x = torch.rand(60, 3, 8, 8, generator=g) * 0.2 + torch.tensor([0.1, 0.4, 0.7]).view(1, 3, 1, 1)
    y = torch.arange(60) % 2
    return Splits(train=(x, y), val=(torch.ones(20, 3, 8, 8), torch.arange(20) % 2),
                  test=(torch.zeros(20, 3, 8, 8), torch.arange(20) % 2))


def trained_stats(monkeypatch, tmp_path, task: Task) -> dict[str, torch.Tensor]:
    module = register(monkeypatch, TASK=task)
    assert train_main([*FAST, "--task", f"{module}:TASK", "--out", str(tmp_path), "--epochs", "1"]) == 0
    return load_checkpoint(tmp_path / "best.pt", task=task)["state_dict"]


@pytest.mark.parametrize("normalize", ["feature", "global", "none"])
def test_vector_normalization(monkeypatch, tmp_path, normalize):
    task = task_of(input=Input("x", (6,), normalize=normalize), data=spread_data)
    state = trained_stats(monkeypatch, tmp_path, task)
    train_x, train_y = spread_data(None).train
    mean, std = state["input_norms.0.mean"], state["input_norms.0.std"]
    if normalize == "feature":  # one mean and std per feature, of the training split (unbiased std)
        want_mean, want_std = train_x.double().mean(0), train_x.double().std(0)
    elif normalize == "global":  # one for every value
        want_mean, want_std = train_x.double().mean().reshape(1), train_x.double().std().reshape(1)
    else:  # identity
        want_mean, want_std = torch.zeros(1), torch.ones(1)
    assert mean.shape == std.shape == want_mean.shape
    torch.testing.assert_close(mean, want_mean.float())
    torch.testing.assert_close(std, want_std.float())
    # the target is always standardized per output, on the training split
    torch.testing.assert_close(state["target_norm.mean"], train_y.double().mean(0).float())


def test_image_channels_get_their_own_statistics(monkeypatch, tmp_path):
    task = task_of(kind="classification", input=Input("image", (3, 8, 8), range=(0.0, 1.0), normalize="feature"),
                   output=Output("logits", 2), classes=("no", "yes"), data=channel_data,
                   models={"cnn": Model(models.CNNConfig, lambda cfg, t: models.CNN(cfg, t.input.shape, t.output.size))})
    state = trained_stats(monkeypatch, tmp_path, task)
    train_x = channel_data(None).train[0].double()
    mean, std = state["input_norms.0.mean"], state["input_norms.0.std"]
    assert mean.shape == std.shape == (3, 1, 1)  # per channel, broadcast over height and width
    torch.testing.assert_close(mean, train_x.mean((0, 2, 3)).reshape(3, 1, 1).float())
    torch.testing.assert_close(std, train_x.std((0, 2, 3)).reshape(3, 1, 1).float())
    assert 0.15 < mean[0].item() < 0.25 and 0.75 < mean[2].item() < 0.85  # not the all-1 validation, all-0 test


# --- no package compares task names ------------------------------------------------------------------

def test_train_export_and_models_never_compare_task_names():
    """The issue's guarantee, `grep -rnE '(==|!=) *"(product|mnist|fashion-mnist)"' train export models`, in
    Python (and with single quotes too): they read the task's declaration instead."""
    pattern = re.compile(r"""(==|!=) *["'](product|mnist|fashion-mnist)["']""")
    hits = [f"{path.relative_to(REPO)}:{i}: {line.strip()}"
            for folder in ("train", "export", "models") for path in sorted((REPO / folder).rglob("*.py"))
            for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert sum(1 for folder in ("train", "export", "models") for _ in (REPO / folder).rglob("*.py")) >= 15
    assert hits == []
