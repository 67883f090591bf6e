"""`python -m export`: checkpoint -> TorchScript / ONNX -> parity -> model store.

    python -m export --format all                      # runs/product/best.pt -> runs/product/export
    python -m export --format onnx --checkpoint runs/fashion-mnist/best.pt --out exports/fmnist
    python -m export --task my_task:TASK --checkpoint runs/mine/best.pt   # a task of your own
    python -m export --quantize int8 --checkpoint runs/fmnist_cnn/best.pt  # + model.int8.onnx behind a gate
    python -m export --checkpoint runs/a/best.pt runs/b/best.pt     # one model: the ensemble of two runs

A checkpoint of a user's own task names the task's --task, but export imports a user's code only
when the command line names it: without --task it stops and says which --task to pass.

Nothing is registered unless every artifact matches the eager model on held-out inputs, and, with
--quantize, unless the quantized model's measured accuracy cost is within the bound (export.quantize):
then the float32 model and the quantized one are registered as two versions of the task's entry.
Exit status: 0 done, 1 parity or the quantization gate failed, 2 a user error (bad option, missing or
foreign checkpoint, data needed to quantize missing).
"""

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

import t2d
from export import parity
from export.artifacts import FORMATS, ONNX_FILE, TORCHSCRIPT_FILE, ExportError, onnx_metadata, \
    write_onnx, write_torchscript
from export.contract import ContractError, contract_of
from export.parity import ParityError
from export.quantize import CALIBRATION_SAMPLES, INT8_FORMATS, METHODS, QUANT_FILE, VARIANTS, GateError, \
    QuantizeOptions, quantize
from export.quantize import failure_message as quantize_failure
from export.quantize import summary as quantize_summary
from export.store import register
from models.checkpoint import CheckpointError, first_line, load_checkpoint, predictor_from_checkpoint
from models.ensemble import Ensemble
from t2d.files import write_json

DEFAULT_CHECKPOINT = Path("runs/product/best.pt")  # best.pt of the default task's default run folder
PARITY_FILE = "parity.json"
SUMMARY_FILE = "summary.json"  # written by `python -m train` beside best.pt, with the plots
PLOTS = ("loss.png", "confusion.png", "predicted_vs_true.png")  # the training pictures a run may draw
MAX_BATCH = 1 << 16  # parity holds a whole batch in memory: 65,536 images are 200 MiB of float32
PACKAGES = ("torch", "onnx", "onnxruntime", "onnxscript", "bentoml", "numpy")


@dataclass
class ExportOptions:
    checkpoint: Path = DEFAULT_CHECKPOINT
    members: tuple[Path, ...] = ()  # more runs of the same task: export their ensemble (models.ensemble) with it
    task: str | None = None  # a user's task, module:ATTRIBUTE; None: the checkpoint's built-in task
    out: Path | None = None  # None: <checkpoint's folder>/export
    formats: tuple[str, ...] = FORMATS
    atol: float = 1e-5
    rtol: float = 1e-5
    batch_sizes: list[int] | None = None  # None: 1, 7 and a large batch sized to the model (parity.large_batch)
    data_dir: str | None = None  # classifier test images; None: the folder the run trained on
    register: bool = True
    quantize: QuantizeOptions | None = None  # also write and gate a quantized variant


@dataclass(frozen=True)
class Run:
    """One training run's checkpoint, read and hashed once for everything export records about it."""
    path: Path
    ckpt: dict[str, Any]
    sha256: str


@dataclass
class Exported:
    task: t2d.Task
    module: torch.nn.Module  # the eager raw-units module every artifact is checked against
    contract: dict[str, Any]
    files: dict[str, Path]  # format -> artifact
    out: Path
    runs: tuple[Run, ...]  # the checkpoint, then an ensemble's other members

    @property
    def ckpt(self) -> dict[str, Any]:
        """The first (or only) run's checkpoint: its task, data folder and split stand for the model's."""
        return self.runs[0].ckpt


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise ValueError(message)


def _path(text: str) -> Path:
    if not text:  # Path("") would be the current folder
        raise argparse.ArgumentTypeError("needs a path, got ''")
    return Path(text)


def parse_args(argv: list[str]) -> ExportOptions:
    p = _Parser(prog="python -m export", description="Export a checkpoint to ONNX/TorchScript, prove parity, "
                                                      "register it in BentoML's model store.")
    p.add_argument("--format", default="all", choices=[*FORMATS, "all"], help="artifacts to write (default: all)")
    p.add_argument("--task", help="the checkpoint's task when it is not built in: module:ATTRIBUTE, as passed to "
                                  "`python -m train` (default: the checkpoint's built-in task)")
    p.add_argument("--checkpoint", type=_path, nargs="+", default=[DEFAULT_CHECKPOINT],
                   help="checkpoint to export; several runs of one task: their ensemble, one model that averages "
                        f"their answers (default: {DEFAULT_CHECKPOINT})")
    p.add_argument("--out", type=_path, help="output folder (default: export/ beside the checkpoint)")
    p.add_argument("--atol", type=float, default=1e-5, help="parity: absolute tolerance (default: 1e-5)")
    p.add_argument("--rtol", type=float, default=1e-5, help="parity: relative tolerance (default: 1e-5)")
    p.add_argument("--batch-sizes", help="parity batch sizes, comma-separated (default: 1, 7 and a large batch: "
                                         "1024, or fewer rows where the model is slow, within a few seconds)")
    p.add_argument("--data-dir", type=_path,
                   help="the task's data folder, for parity inputs from its test split (default: the run's data.dir)")
    p.add_argument("--no-register", action="store_true", help="write and check the artifacts only")
    p.add_argument("--quantize", choices=VARIANTS,
                   help="also write model.<variant>.onnx and register it only if it passes the accuracy gate on the "
                        "task's test split (default: none)")
    p.add_argument("--max-accuracy-drop", type=float, default=0.5,
                   help="quantization gate, classifiers: test accuracy points the variant may lose (default: 0.5)")
    p.add_argument("--max-error-increase", type=float, default=10.0,
                   help="quantization gate, regression: %% the variant's mean relative error may exceed the "
                        "float32 model's (default: 10)")
    p.add_argument("--int8-method", choices=METHODS, default="auto",
                   help="int8: static (calibrated QDQ), dynamic, or auto: static for classifiers, dynamic for "
                        "regression and models that take ids (default: auto)")
    p.add_argument("--int8-format", choices=INT8_FORMATS, default="portable",
                   help="int8: portable (right on every x86-64 CPU) or vnni (full 8-bit weights, for CPUs with "
                        "avx512_vnni, avx_vnni or amx_int8 only; served nowhere else) (default: portable)")
    p.add_argument("--keep-float", default="",
                   help="int8: layers to leave in float32, comma-separated torch module paths (net.fc) or ONNX node "
                        "names; quantization.json lists the model's layers (default: none)")
    p.add_argument("--no-int8-fallback", action="store_true",
                   help="int8: do not keep further layers in float32 when the variant misses the bound on a "
                        "validation sample of the training split (default: keep the fewest that bring it within)")
    p.add_argument("--calibration-samples", type=int, default=CALIBRATION_SAMPLES,
                   help="int8 static: training samples to calibrate activation ranges on "
                        f"(default: {CALIBRATION_SAMPLES})")
    a = p.parse_args(argv)
    sizes = None
    if a.batch_sizes is not None:
        try:
            sizes = [int(s) for s in a.batch_sizes.split(",")]
        except ValueError:
            raise ValueError(f"--batch-sizes must be comma-separated integers, got {a.batch_sizes!r}") from None
        if not sizes or min(sizes) < 1 or max(sizes) > MAX_BATCH:
            raise ValueError(f"--batch-sizes must be in [1, {MAX_BATCH}], got {a.batch_sizes!r}")
    for name in ("atol", "rtol"):
        if not 0 <= getattr(a, name) < float("inf"):  # also refuses nan
            raise ValueError(f"--{name} must be a non-negative number (and finite), got {getattr(a, name)}")
    if a.data_dir is not None and not a.data_dir.is_dir():
        raise ValueError(f"--data-dir {a.data_dir} is not a folder")
    if a.out is not None:  # the nearest existing part must be a folder, or writing fails after the export
        nearest = next(f for f in (a.out, *a.out.parents) if f.exists())
        if not nearest.is_dir():
            raise ValueError(f"--out {a.out} cannot be a folder: {nearest} is a file")
    if a.task == "":
        raise ValueError("--task needs a value")
    # Checked with or without --quantize: a bound that is nonsense is a mistake either way.
    for name in ("max_accuracy_drop", "max_error_increase"):
        if not 0 <= getattr(a, name) < float("inf"):
            raise ValueError(f"--{name.replace('_', '-')} must be a non-negative number, got {getattr(a, name)}")
    if a.calibration_samples < 1:
        raise ValueError(f"--calibration-samples must be >= 1, got {a.calibration_samples}")
    keep_float = tuple(n.strip() for n in a.keep_float.split(",") if n.strip())
    if (keep_float or a.no_int8_fallback) and a.quantize != "int8":
        raise ValueError("--keep-float and --no-int8-fallback choose int8 layers: add --quantize int8")
    quant = None
    if a.quantize:
        if a.format == "torchscript":
            raise ValueError("--quantize works on the ONNX model: use --format onnx or all")
        quant = QuantizeOptions(a.quantize, a.int8_method, a.calibration_samples, a.max_accuracy_drop,
                                a.max_error_increase, a.int8_format, keep_float, not a.no_int8_fallback)
    return ExportOptions(checkpoint=a.checkpoint[0], members=tuple(a.checkpoint[1:]), task=a.task, out=a.out,
                         formats=FORMATS if a.format == "all" else (a.format,), atol=a.atol, rtol=a.rtol,
                         batch_sizes=sizes, data_dir=None if a.data_dir is None else str(a.data_dir),
                         register=not a.no_register, quantize=quant)


def write_artifacts(opts: ExportOptions) -> Exported:
    """Load the checkpoint, trace it, write the requested artifacts (not yet trusted)."""
    if not opts.checkpoint.exists() and opts.checkpoint == DEFAULT_CHECKPOINT:
        raise CheckpointError(f"no checkpoint at {DEFAULT_CHECKPOINT}: train one with `python -m train` "
                              "or pass --checkpoint PATH")
    ckpt = load_checkpoint(opts.checkpoint)  # refuses foreign, mismatched and non-finite weights, as --resume does
    task = task_of(ckpt, opts)
    first = Run(opts.checkpoint, ckpt, sha256(opts.checkpoint))
    runs = (first, *member_runs(first, opts.members, task))
    modules = [predictor_from_checkpoint(run.ckpt, task) for run in runs]
    module = Ensemble(modules, task.kind == "classification") if opts.members else modules[0]
    contract = contract_of(task, module)
    out = opts.out or opts.checkpoint.parent / "export"
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    if "onnx" in opts.formats:
        files["onnx"] = out / ONNX_FILE
        write_onnx(module, task, contract, files["onnx"], onnx_metadata(contract, {
            "task": ckpt["task"], "checkpoint_sha256": ",".join(run.sha256 for run in runs)}))
    if "torchscript" in opts.formats:
        files["torchscript"] = out / TORCHSCRIPT_FILE
        write_torchscript(module, task, files["torchscript"])
    return Exported(task, module, contract, files, out, runs)


def member_runs(first: Run, members: tuple[Path, ...], task: t2d.Task) -> list[Run]:
    """The other runs of an ensemble, each checked to be a run of `task`, and none a second copy of another."""
    seen = {first.sha256: first.path}
    found = []
    for path in members:
        digest = sha256(path) if path.is_file() else None
        if digest in seen:
            raise ValueError(f"--checkpoint names the same weights twice ({seen[digest]} and {path}): an ensemble's "
                             "members are different runs")
        seen[digest] = path
        found.append(Run(path, load_checkpoint(path, task=task), digest))
    return found


def task_of(ckpt: dict[str, Any], opts: ExportOptions) -> t2d.Task:
    """The checkpoint's task: the --task given (which must be that task), else its built-in task."""
    name, ref = ckpt["task"], ckpt.get("task_ref")
    if opts.task is None:
        task = None if ref else t2d.builtin_tasks().get(name)
        if task is None:
            hint = f"--task {ref}" if ref else "--task module:ATTRIBUTE (the task's Python file)"
            raise ValueError(f"{opts.checkpoint} was trained on task {name}, which is not built in; pass {hint} "
                             "(export imports a task's code only when the command line names it)")
        return task
    try:
        task = t2d.resolve(opts.task)
    except t2d.TaskError as e:
        raise ValueError(str(e)) from None
    if task.name != name:
        raise ValueError(f"--task {opts.task} is task {task.name}; {opts.checkpoint} was trained on task {name}")
    return task


def verify_and_register(exp: Exported, opts: ExportOptions) -> tuple[dict[str, Any], str | None]:
    """Check parity (writing parity.json either way); register only if it passed. Returns (report, tag)."""
    report = verify(exp, opts)
    return report, register_float(exp, report, opts) if opts.register else None


def verify(exp: Exported, opts: ExportOptions) -> dict[str, Any]:
    """The parity report (also written to parity.json); ParityError unless it passed."""
    sizes, large = opts.batch_sizes, None
    if sizes is None:
        large = parity.large_batch(exp.module, exp.task)
        sizes = [1, 7, large["rows"]]
    inputs = parity.held_out_inputs(exp.task, exp.ckpt, max(sizes), opts.data_dir)
    report = parity.check(exp.module, exp.contract, exp.files, inputs, sizes, opts.atol, opts.rtol, exp.task)
    if large is not None:
        report["large_batch"] = large
    report["checkpoint"] = str(opts.checkpoint)
    if opts.members:
        report["members"] = [str(run.path) for run in exp.runs]
    write_json(exp.out / PARITY_FILE, report)
    if not report["passed"]:
        raise ParityError(parity.failure_message(report))
    return report


def register_float(exp: Exported, report: dict[str, Any], opts: ExportOptions) -> str:
    files = {**exp.files, "parity": exp.out / PARITY_FILE}
    run = run_record(exp)
    plots = [opts.checkpoint.parent / name for name in run.get("plots", [])]
    return register(exp.task.name, files, exp.contract, store_metadata(exp, report, opts, run), plots)


def quantize_and_register(exp: Exported, opts: ExportOptions) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Parity, then the quantized variant and its gate (quantization.json either way), then, only if both
    held, the float32 model and the variant as two entries. Returns (parity report, quantization report, tags)."""
    report = verify(exp, opts)
    q = opts.quantize
    quant = quantize(exp.task, exp.ckpt, exp.contract, exp.files["onnx"], exp.out, q, opts.data_dir)
    if not quant["passed"]:
        raise GateError(quantize_failure(q.variant, quant))
    if not opts.register:
        return report, quant, []
    tags = [register_float(exp, report, opts)]
    run = run_record(exp)
    plots = [opts.checkpoint.parent / name for name in run.get("plots", [])]
    contract = {**exp.contract, "variant": q.variant}
    meta = {**store_metadata(exp, report, opts, run), "contract": contract, "variant": q.variant,
            "quantization": quantize_summary(quant), "float_model": tags[0], "formats": ["onnx"]}
    files = {"onnx": Path(quant["file"]), "parity": exp.out / PARITY_FILE, "quantization": exp.out / QUANT_FILE,
             "selfcheck": exp.out / quant["self_check"]["file"]}
    tags.append(register(exp.task.name, files, contract, meta, plots))
    return report, quant, tags


def run_record(exp: Exported) -> dict[str, Any]:
    """What the training run wrote beside the checkpoint about it, for the model card (`serve.ui`): its
    train_seconds and test metrics (summary.json) and which plots exist. Only when that summary is this
    checkpoint's run (same task and best epoch): a best.pt copied elsewhere or a later run's summary gets none.
    An ensemble: the members' runs, each as `members` of the store's metadata lists them, and their seconds
    summed; no test metrics or plots, which are one member's and not the ensemble's."""
    if len(exp.runs) > 1:
        runs = [member_record(run) for run in exp.runs]
        seconds = [r.get("train_seconds") for r in runs]
        total = sum(seconds) if all(isinstance(t, (int, float)) for t in seconds) else None
        return {"train_seconds": total, "members": runs}
    return _run_summary(exp.ckpt, exp.runs[0].path)


def member_record(member: Run) -> dict[str, Any]:
    run = _run_summary(member.ckpt, member.path)
    return {"checkpoint": str(member.path), "checkpoint_sha256": member.sha256, "arch": member.ckpt["arch"],
            "epoch": member.ckpt["epoch"], "validation_metrics": member.ckpt.get("metrics") or {},
            "train_seconds": run.get("train_seconds"), "test_metrics": run.get("test_metrics")}


def _run_summary(ckpt: dict[str, Any], checkpoint: Path) -> dict[str, Any]:
    try:
        summary = json.loads((checkpoint.parent / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if (not isinstance(summary, dict) or summary.get("task") != ckpt["task"]
            or summary.get("best_epoch") != ckpt["epoch"]):
        return {}
    plots = [name for name in PLOTS if (checkpoint.parent / name).is_file()
             and not (checkpoint.parent / name).is_symlink()]
    return {"train_seconds": summary.get("train_seconds"), "test_metrics": summary.get("test"), "plots": plots}


def store_metadata(exp: Exported, report: dict[str, Any], opts: ExportOptions,
                   run: dict[str, Any] | None = None) -> dict[str, Any]:
    ckpt, run = exp.ckpt, run or {}
    if opts.members:  # one model of several runs: the runs' own facts are each member's, not the model's
        archs = [m["arch"] for m in run["members"]]
        ensemble = {"arch": f"ensemble of {len(archs)}: {', '.join(archs)}", "epoch": None,
                    "training_metrics": {}, "checkpoint_sha256": None, "members": run["members"]}
    else:
        ensemble = {}
    return {
        "task": exp.task.name,
        "task_ref": ckpt.get("task_ref"),
        "arch": ckpt["arch"],
        "parameters": sum(p.numel() for p in exp.module.parameters()),
        "contract": exp.contract,
        "normalization": exp.contract["normalization"],
        "classes": exp.contract["classes"],
        "training_metrics": ckpt.get("metrics") or {},
        "epoch": ckpt["epoch"],
        "train_seconds": run.get("train_seconds"),  # None (left out) without the run's summary.json
        "test_metrics": run.get("test_metrics"),
        "plots": run.get("plots", []),  # file names in the entry, beside model.onnx
        "parity": {"passed": report["passed"], "atol": report["atol"], "rtol": report["rtol"],
                   "batch_sizes": report["batch_sizes"], "inputs": report["inputs"],
                   "worst": {f: {"max_abs_err": c["max_abs_err"], "max_rel_err": c["max_rel_err"], "batch": c["batch"]}
                             for f, c in report["worst"].items()}},
        "formats": sorted(exp.files),
        "checkpoint": str(opts.checkpoint),
        "checkpoint_sha256": exp.runs[0].sha256,
        "versions": package_versions(),
    } | ensemble


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def summary_lines(exp: Exported, report: dict[str, Any]) -> list[str]:
    lines = []
    for fmt, path in exp.files.items():
        w = report["worst"][fmt]
        sizes = f" and sizes {', '.join(map(str, report['sizes']))}" if report.get("sizes") else ""
        lines.append(f"{fmt:<12} {path}  {path.stat().st_size / 1024:.0f} KiB  parity ok at batch "
                     f"{', '.join(map(str, report['batch_sizes']))}{sizes}: max abs err {w['max_abs_err']:.2e}, "
                     f"max rel err {w['max_rel_err']:.2e}")
    return lines


def main(argv: list[str] | None = None) -> int:
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
        exp = write_artifacts(opts)
        if opts.quantize:
            report, quant, tags = quantize_and_register(exp, opts)
        else:
            (report, tag), quant = verify_and_register(exp, opts), None
            tags = [tag] if tag else []
    except ParityError as e:
        print(f"error: {e}; nothing registered (details in parity.json)", file=sys.stderr)
        return 1
    except GateError as e:
        print(f"error: {e}; nothing registered (details in {QUANT_FILE})", file=sys.stderr)
        return 1
    except (ValueError, CheckpointError, ContractError, ExportError, OSError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing registered", file=sys.stderr)
        return 130
    if len(exp.runs) > 1:
        print(f"ensemble    {len(exp.runs)} runs, their answers averaged: "
              f"{', '.join(str(run.path) for run in exp.runs)}")
    for line in summary_lines(exp, report):
        print(line)
    print(f"parity      {exp.out / PARITY_FILE}  ({report['inputs']})")
    if quant:
        print(quant_line(quant))
    for tag, variant in zip(tags, ["fp32", *([opts.quantize.variant] if opts.quantize else [])]):
        which = f" ({variant})" if opts.quantize else ""  # without --quantize, the line is as it always was
        print(f"registered  {tag}{which} in the BentoML model store (serve it with `bentoml serve`)")
    return 0


def quant_line(quant: dict[str, Any]) -> str:
    g, size = quant["gate"], quant["size_bytes"]
    if "accuracy_drop" in g:
        cost = (f"test accuracy {g['quantized_accuracy']:.2f}% vs {g['float_accuracy']:.2f}% float32 "
                f"({0.0 - g['accuracy_drop']:+.2f} points, bound -{g['max_accuracy_drop']:g}), "
                f"argmax agrees on {g['agreement']:.2%}")
    else:
        cost = (f"test MRE {g['quantized_mre']:.4g}% vs {g['float_mre']:.4g}% float32 "
                f"({g['error_increase']:+.1f}%, bound +{g['max_error_increase']:g}%), "
                f"{g['agreement']:.2%} of rows within 1%")
    how = quant["method"] + (f" {quant['int8_format']}" if "int8_format" in quant else "")
    kept = [layer["module"] or layer["node"] for layer in quant.get("kept_float") or []]
    if kept:
        cost += f"; kept in float32: {', '.join(kept)}"
    return (f"{quant['variant']:<12}{quant['file']}  {size[quant['variant']] / 1024:.0f} KiB "
            f"({size['ratio']:.2f}x float32), {how}: {cost}")
