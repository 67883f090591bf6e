"""Every option of `python -m train` and `python -m export`, each with a missing, a wrong-type and an
out-of-range value: exit 2 and one `error: ` line on stderr that names the option, never a traceback.

The options are enumerated, not picked by hand: the flags from each command's --help, and the config
fields from train.config's section dataclasses and the model architectures' config dataclasses. The bad
values come from each field's type (int: a word, a fraction, -1; float: a word, -1, nan, +-inf, 1e400;
bool: a word; a choice: an unknown name; list: a word and -1; any: a missing and an empty value), plus
the per-field bounds in EXTRA. A new field or flag is swept without editing this file, and
test_every_option_is_swept fails if --help shows a flag this file does not know.

All runs are in this process (`train.main.main`, `export.main.main`). A value that is wrongly accepted
starts a tiny CPU run (256 points, one epoch; no registration), which then fails the test by exiting 0.
"""

import dataclasses
import re
import typing

import numpy as np
import pytest
import torch
from conftest import one_error_line, predictor
from conftest import train as train_in_process
from conftest import write_image_set

import export.main
import t2d
import train.main
from models.checkpoint import save_checkpoint
from train.config import SECTIONS

# Every architecture of a built-in task -> (its config dataclass, the first built-in task that has it).
ARCHITECTURES: dict[str, tuple[type, str]] = {}
for _task in t2d.builtin_tasks().values():
    for _arch, _model in _task.models.items():
        ARCHITECTURES.setdefault(_arch, (_model.config, _task.name))

# --- python -m train ------------------------------------------------------------------------------

# A tiny product run on CPU, as field -> value, so that sweeping a field can leave its own base value out
# (a shortcut flag such as --epochs would otherwise beat a swept --run.epochs).
PRODUCT_BASE = {"run.device": "cpu", "run.epochs": "1", "log.tensorboard": "false", "log.plots": "false",
                "data.size": "256", "data.val_size": "64", "data.test_size": "256"}
IMAGE_BASE = {"run.task": "mnist", "run.device": "cpu", "run.epochs": "1", "log.tensorboard": "false",
              "log.plots": "false", "data.val_size": "50", "data.download": "false", "data.dir": "{images}"}
# The shortcut flags and the field each sets (train.main.parse_args).
SHORTCUTS = {"--task": "run.task", "--out": "run.out", "--epochs": "run.epochs", "--seed": "run.seed",
             "--device": "run.device", "--precision": "run.precision", "--folds": "run.folds",
             "--data-dir": "data.dir"}
# str fields that take any text rather than one of a few names: swept with these values instead.
FREE_TEXT = {"run.out": ["{tmp}/a-file", "{tmp}/a-file/run"], "data.dir": ["{tmp}/a-file", "{tmp}/no-such-dir"]}
# Bounds beyond the type's generic values: field (model fields: field@arch) -> values, or (value, extra
# arguments that make the value matter).
EXTRA = {
    "run.epochs": ["0"], "run.folds": ["0"], "run.seed": [str(2**64)], "run.threads": [str(2**31)],
    "data.size": ["1"], "data.val_size": ["0"], "data.test_size": ["0"], "data.batch_size": ["0"],
    "data.eval_batch_size": ["0"], "data.crop_padding": ["28"], "data.test_seed": [str(2**64)],
    "optim.lr": ["0"], "optim.momentum": ["1"], "optim.label_smoothing": ["1"], "optim.max_iter": ["0"],
    "optim.history_size": ["0"],
    "optim.nesterov": [("true", ["--optim.name", "sgd", "--optim.momentum", "0"])],  # torch: needs momentum
    "optim.weight_decay": [("0.1", ["--optim.name", "lbfgs"])],
    "optim.clip_grad_norm": [("1", ["--optim.name", "lbfgs"])],
    "sched.step_size": ["0"], "sched.gamma": ["0"], "sched.factor": ["0", "1"], "sched.pct_start": ["0", "1"],
    "sched.min_lr": [("0.5", ["--sched.name", "cosine", "--optim.lr", "0.1"])],  # above the peak rate
    "stop.monitor": ["accuracy"],  # an image metric, for the product task
    "log.print_every": ["0"],
    "model.hidden@product_mlp": ["0", "[]"], "model.dropout@product_mlp": ["1"],
    "model.hidden@mlp": ["0"], "model.dropout@mlp": ["1"],
    "model.channels@cnn": ["[8,8]", "[8,0,8]"], "model.dropout@cnn": ["1"],
    "model.convs_per_block@cnn": ["[1,1]", "[1,0,1]"],
}


@dataclasses.dataclass(frozen=True)
class Field:
    name: str  # section.field
    tp: typing.Any
    arch: str | None  # model fields: the architecture they belong to

    @property
    def key(self) -> str:
        return f"{self.name}@{self.arch}" if self.arch else self.name


def config_fields() -> list[Field]:
    """Every field a config can set: the sections' dataclass fields, model.arch, and each architecture's fields."""
    found = [Field(f"{section}.{f.name}", typing.get_type_hints(cls)[f.name], None)
             for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    found.append(Field("model.arch", str, None))
    for arch, (cls, _) in ARCHITECTURES.items():
        found += [Field(f"model.{f.name}", typing.get_type_hints(cls)[f.name], arch) for f in dataclasses.fields(cls)]
    return found


FIELDS = {f.key: f for f in config_fields()}


def bad_values(field: Field) -> list[tuple[str, list[str]]]:
    """(value, extra arguments) that must be refused for `field`, from its type and EXTRA."""
    tp = field.tp
    if typing.get_origin(tp) is list:
        values = ["8,x", "-1"]
    elif tp is bool:
        values = ["maybe", "2"]
    elif tp is int:
        values = ["ten", "1.5", "-1"]
    elif tp is float:
        values = ["fast", "-1", "nan", "inf", "-inf", "1e400"]
    elif tp is str:
        values = FREE_TEXT.get(field.name, ["bogus"])
    else:
        raise AssertionError(f"{field.key}: no bad values for type {tp}; teach bad_values() about it")
    if field.name not in FREE_TEXT:
        values = [*values, ""]  # an empty value means "the default" only for free-text fields
    return [v if isinstance(v, tuple) else (v, []) for v in [*values, *EXTRA.get(field.key, [])]]


def context(field: Field) -> dict[str, str]:
    """Base settings in which `field`'s value matters: an image task for image fields, else product."""
    if field.arch and ARCHITECTURES[field.arch][1] != "product":
        return {**IMAGE_BASE, "run.task": ARCHITECTURES[field.arch][1], "model.arch": field.arch}
    if field.name == "data.dir":
        return IMAGE_BASE
    return PRODUCT_BASE


def flags(base: dict[str, str], skip: str = "") -> list[str]:
    return [arg for name, value in base.items() if name != skip for arg in (f"--{name}", value)]


def train_argv(base: dict[str, str], skip: str, tail: list[str], tmp) -> list[str]:
    """`base` without the swept field `skip`, a run folder in `tmp`, then `tail`; {tmp} and {images} filled in."""
    out = ["--run.out", f"{tmp}/out"] if skip != "run.out" else []
    return [a.format(tmp=tmp, images=tmp / "images") for a in [*out, *flags(base, skip), *tail]]


def train_cases():
    """(id, field, arguments after the base, the option's name) for every field and every shortcut flag."""
    for field in FIELDS.values():
        yield f"--{field.key} missing", field, [f"--{field.name}"], field.name
        for value, extra in bad_values(field):
            yield f"--{field.key} {value!r}", field, [*extra, f"--{field.name}", value], field.name
    for flag, name in SHORTCUTS.items():
        field = FIELDS[name]
        yield f"{flag} missing", field, [flag], flag
        values = bad_values(field) + ([] if name not in FREE_TEXT else [("", [])])  # a flag's empty value: always bad
        for value, extra in values:
            yield f"{flag} {value!r}", field, [*extra, flag, value], flag


TRAIN_CASES = {case_id: (field, tail, option) for case_id, field, tail, option in train_cases()}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """Images for the image tasks, a plain file where a folder belongs, and bad YAML and checkpoint files."""
    tmp = tmp_path_factory.mktemp("sweep")
    write_image_set(tmp / "images", gz=True, n_train=100, n_test=20)
    (tmp / "a-file").write_text("not a folder\n")
    (tmp / "folder").mkdir()
    yamls = {"bad": "optim:\n  lr: [0.1\n", "list": "- optim\n", "section": "training: {lr: 1}\n",
             "key": "optim: {learning_rate: 1}\n", "type": "run: {epochs: ten}\n", "range": "optim: {lr: -1}\n",
             "inf": "optim: {lr: .inf}\n", "scalar": "optim: 3\n", "model": "model: {hidden: {a: 1}}\n",
             "python": "run: !!python/object/apply:os.system ['true']\n"}
    for name, text in yamls.items():
        (tmp / f"{name}.yaml").write_text(text)
    (tmp / "noise.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    torch.save({"epoch": 3, "weights": torch.ones(2)}, tmp / "foreign.pt")
    torch.save(predictor("product", "product_mlp").state_dict(), tmp / "state_dict.pt")
    save_checkpoint({"task": "product", "arch": "product_mlp", "model_config": {}, "epoch": 1,
                     "state_dict": predictor("product", "product_mlp").state_dict()}, tmp / "weights.pt")
    train_in_process([*flags(PRODUCT_BASE), "--log.checkpoint_every_s", "0"], tmp / "run")  # for --resume
    return tmp


FILE_CASES = {  # the flags that name a file: (arguments, what the error line must contain)
    "--config missing": (["--config"], "--config"),
    "--config ''": (["--config", ""], "--config"),
    "--config absent file": (["--config", "{tmp}/absent.yaml"], "{tmp}/absent.yaml"),
    "--config folder": (["--config", "{tmp}/folder"], "{tmp}/folder"),
    "--config not YAML": (["--config", "{tmp}/bad.yaml"], "not valid YAML"),
    "--config list": (["--config", "{tmp}/list.yaml"], "{tmp}/list.yaml"),
    "--config python tag": (["--config", "{tmp}/python.yaml"], "{tmp}/python.yaml"),
    "--config unknown section": (["--config", "{tmp}/section.yaml"], "'training'"),
    "--config unknown key": (["--config", "{tmp}/key.yaml"], "optim.learning_rate"),
    "--config wrong type": (["--config", "{tmp}/type.yaml"], "run.epochs"),
    "--config out of range": (["--config", "{tmp}/range.yaml"], "optim.lr"),
    "--config infinite": (["--config", "{tmp}/inf.yaml"], "optim.lr"),
    "--config scalar section": (["--config", "{tmp}/scalar.yaml"], "'optim'"),
    "--config model dict": (["--config", "{tmp}/model.yaml"], "model.hidden"),
    "--resume missing": (["--resume"], "--resume"),
    "--resume ''": (["--resume", ""], "--resume"),
    "--resume absent file": (["--resume", "{tmp}/absent.pt"], "{tmp}/absent.pt"),
    "--resume folder": (["--resume", "{tmp}/folder"], "{tmp}/folder"),
    "--resume random bytes": (["--resume", "{tmp}/noise.pt"], "{tmp}/noise.pt"),
    "--resume foreign pickle": (["--resume", "{tmp}/foreign.pt"], "{tmp}/foreign.pt"),
    "--resume bare state_dict": (["--resume", "{tmp}/state_dict.pt"], "{tmp}/state_dict.pt"),
    "--resume no training state": (["--resume", "{tmp}/weights.pt"], "{tmp}/weights.pt"),
    "--resume another task": (["--resume", "{tmp}/run/last.pt", "--task", "mnist"], "--task mnist"),
    "--resume finished": (["--resume", "{tmp}/run/last.pt", "--epochs", "1"], "--epochs"),
}


def run_train(capsys, argv) -> str:
    rc = train.main.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, f"exit {rc} for {argv}\n{err}"
    return one_error_line(err)


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_option(scratch, capsys, case):
    field, tail, option = TRAIN_CASES[case]
    argv = train_argv(context(field), field.name, tail, scratch)
    line = run_train(capsys, argv)
    # A shortcut's error may name the field it sets (--epochs: run.epochs), a folder's error the folder.
    names = [option, field.name, *([argv[-1]] if "/" in argv[-1] else [])]
    if field.name == "run.task":  # a task's errors name the flag --task, which sets run.task
        names.append("--task")
    assert any(name in line for name in names), f"{case}: the error names none of {names}: {line}"


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_train_file_option(scratch, capsys, case):
    args, expected = FILE_CASES[case]
    line = run_train(capsys, train_argv(PRODUCT_BASE, "", args, scratch))
    assert expected.format(tmp=scratch) in line


# --- python -m export -----------------------------------------------------------------------------

EXPORT_CASES = {  # flag -> [(arguments, what the error line must contain)]
    "--checkpoint": [(["--checkpoint"], "--checkpoint"), (["--checkpoint", ""], "--checkpoint"),
                     (["--checkpoint", "{tmp}/absent.pt"], "{tmp}/absent.pt"),
                     (["--checkpoint", "{tmp}/folder"], "{tmp}/folder"),
                     (["--checkpoint", "{tmp}/noise.pt"], "{tmp}/noise.pt"),
                     (["--checkpoint", "{tmp}/foreign.pt"], "{tmp}/foreign.pt"),
                     (["--checkpoint", "{tmp}/state_dict.pt"], "{tmp}/state_dict.pt")],
    "--format": [(["--format"], "--format"), (["--format", ""], "--format"), (["--format", "tflite"], "--format"),
                 (["--format", "ONNX"], "--format")],
    "--out": [(["--out"], "--out"), (["--out", ""], "--out"), (["--out", "{tmp}/a-file"], "{tmp}/a-file"),
              (["--out", "{tmp}/a-file/export"], "{tmp}/a-file")],
    "--batch-sizes": [(["--batch-sizes"], "--batch-sizes"), (["--batch-sizes", ""], "--batch-sizes"),
                      (["--batch-sizes", "1,x"], "--batch-sizes"), (["--batch-sizes", "1.5"], "--batch-sizes"),
                      (["--batch-sizes", "1,,7"], "--batch-sizes"), (["--batch-sizes", "0"], "--batch-sizes"),
                      (["--batch-sizes", "7,-1"], "--batch-sizes"), (["--batch-sizes", str(2**40)], "--batch-sizes")],
    "--data-dir": [(["--data-dir"], "--data-dir"), (["--data-dir", ""], "--data-dir"),
                   (["--data-dir", "{tmp}/no-such-dir"], "{tmp}/no-such-dir"),
                   (["--data-dir", "{tmp}/a-file"], "{tmp}/a-file")],
    "--no-register": [(["--no-register=yes"], "--no-register")],
    # the checkpoint is the product task's: another task, or one that cannot be found, is refused
    "--task": [(["--task"], "--task"), (["--task", ""], "--task"), (["--task", "bogus"], "--task"),
               (["--task", "mnist"], "--task mnist"), (["--task", "no_such_module_here:TASK"], "--task"),
               (["--task", "t2d:Task"], "not a t2d.Task")],
    **{flag: [([flag], flag), ([flag, ""], flag), ([flag, "tight"], flag), ([flag, "-1"], flag),
              ([flag, "nan"], flag), ([flag, "inf"], flag), ([flag, "1e400"], flag)]
       for flag in ("--atol", "--rtol", "--max-accuracy-drop", "--max-error-increase")},
    "--quantize": [(["--quantize"], "--quantize"), (["--quantize", ""], "--quantize"),
                   (["--quantize", "int4"], "--quantize"), (["--quantize", "int8", "--format", "torchscript"],
                                                            "--quantize works on the ONNX model")],
    "--calibration-samples": [(["--calibration-samples"], "--calibration-samples"),
                              (["--calibration-samples", ""], "--calibration-samples"),
                              (["--calibration-samples", "many"], "--calibration-samples"),
                              (["--calibration-samples", "0"], "--calibration-samples")],
    "--int8-method": [(["--int8-method"], "--int8-method"), (["--int8-method", "fast"], "--int8-method")],
    "--int8-format": [(["--int8-format"], "--int8-format"), (["--int8-format", "avx2"], "--int8-format")],
    "--keep-float": [(["--keep-float"], "--keep-float"), (["--keep-float", "net.layers.0"], "add --quantize int8"),
                     (["--quantize", "int8", "--keep-float", "net.nope"], "--keep-float net.nope: no quantizable")],
    "--no-int8-fallback": [(["--no-int8-fallback=yes"], "--no-int8-fallback"),
                           (["--no-int8-fallback"], "add --quantize int8")],
}


@pytest.mark.parametrize("case", [f"{flag} {args[1:]!r}" for flag, cases in EXPORT_CASES.items()
                                  for args, _ in cases])
def test_export_option(scratch, capsys, case):
    flag = case.split(" ")[0]
    args, expected = next((a, e) for a, e in EXPORT_CASES[flag] if f"{flag} {a[1:]!r}" == case)
    argv = [a.format(tmp=scratch) for a in args]
    if "--checkpoint" not in argv:
        argv = ["--checkpoint", str(scratch / "run" / "best.pt"), *argv]
    if "--out" not in argv:
        argv = ["--out", str(scratch / "export"), *argv]
    rc = export.main.main(["--format", "onnx", "--no-register", *argv] if flag != "--format" else
                          ["--no-register", *argv])
    err = capsys.readouterr().err
    assert rc == 2, f"exit {rc} for {argv}\n{err}"
    assert expected.format(tmp=scratch) in one_error_line(err)


# --- the sweep covers everything ------------------------------------------------------------------

def test_every_option_is_swept(capsys):
    for main in (train.main.main, export.main.main):
        with pytest.raises(SystemExit):
            main(["--help"])
        flags = set(re.findall(r"(?<![\w.-])(--[a-z][a-z0-9-]*)(?![\w.-])", capsys.readouterr().out)) - {"--help"}
        known = {*SHORTCUTS, "--config", "--resume"} if main is train.main.main else set(EXPORT_CASES)
        assert flags == known, f"--help shows {sorted(flags - known)}, the sweep knows {sorted(known - flags)}"
    # Every field of every section and architecture, counted another way: the keys of the resolved
    # configs, which are what YAML files and --section.field set.
    resolved = set()
    for arch, (_, task) in ARCHITECTURES.items():
        cfg = train.main.parse_args(["--task", task, "--model.arch", arch])[0].to_dict()
        resolved |= {f"model.{k}@{arch}" if k != "arch" else "model.arch" for k in cfg.pop("model")}
        resolved |= {f"{section}.{k}" for section, values in cfg.items() for k in values}
    assert resolved == set(FIELDS)
    assert len(FIELDS) == sum(len(dataclasses.fields(c)) for c in SECTIONS.values()) + 1 + sum(
        len(dataclasses.fields(c)) for c, _ in ARCHITECTURES.values())
    assert len(FIELDS) >= 58  # at the time of writing: 44 section fields, model.arch, 17 architecture fields
    assert set(EXTRA) <= set(FIELDS), f"EXTRA names unknown fields: {sorted(set(EXTRA) - set(FIELDS))}"
    assert set(FREE_TEXT) <= set(FIELDS)
    swept = {field.key for field, *_ in TRAIN_CASES.values()}
    assert swept == set(FIELDS)
