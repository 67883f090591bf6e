"""`python -m train`: parse the command line, train, test, and write the run folder.

    python -m train --task product --out runs/product
    python -m train --task fashion-mnist --config configs/fashion_mnist_cnn.yaml --epochs 15
    python -m train --resume runs/product/last.pt --epochs 2000
    python -m train --task my_task:TASK --out runs/mine     # a t2d.Task of your own, in my_task.py
    torchrun --nproc_per_node=2 -m train --task mnist

Writes to the run folder: config.yaml, last.pt, best.pt, metrics.jsonl, tensorboard/, summary.json,
loss.png and predicted_vs_true.png (product) or confusion.png (images).
"""

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from models import build_predictor
from models.checkpoint import CheckpointError, first_line, load_checkpoint, remove_stale_temp_files, save_checkpoint, \
    validate_checkpoint
from t2d import DataError, builtin_tasks, is_builtin
from t2d.cpu import cpu_info
from t2d.splits import join
from train.budget import Plan, plan_epochs
from train.config import SECTIONS, Config, ConfigError, build_config, load_yaml, parse_overrides
from train.data import TaskData, load_task_data
from train.engine import NonFiniteLossError, evaluate, predict
from train.fit import FitResult, check_output_shape, check_resume_data, check_resume_state, fit, use_channels_last
from t2d.files import write_json
from train.report import RunLog, fmt_metrics, read_history, scalars
from train.runtime import Runtime, barrier, setup, teardown

USER_ERRORS = (ConfigError, CheckpointError, DataError, NonFiniteLossError, OSError)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise ConfigError(message)


def parse_args(argv: list[str]) -> tuple[Config, dict | None]:
    """The resolved config, and the checkpoint to resume from (or None)."""
    p = _Parser(prog="python -m train", description="Train a task (built in, or a t2d.Task of your own) and write "
                                                     "a run folder.",
                epilog="Any config field can be set as --section.field value; sections: "
                       + ", ".join(["model", *SECTIONS]) + ". See configs/ and docs/training.md.")
    p.add_argument("--task", help=f"{' | '.join(builtin_tasks())} | module:ATTRIBUTE, a t2d.Task in a Python file on "
                                  "the path, e.g. my_task:TASK (default: product)")
    p.add_argument("--out", help="run folder (default: runs/<task>)")
    p.add_argument("--epochs", help="maximum epochs (default: 1000 for product, 5 for images)")
    p.add_argument("--seed", help="random seed (default: 0)")
    p.add_argument("--device", help="auto | cpu | cuda | mps (default: auto)")
    p.add_argument("--precision", help="auto | fp32 | bf16 | fp16 (default: auto = bf16 on CUDA for images)")
    p.add_argument("--folds", help="k-fold cross-validation with K folds (default: 1 = off)")
    p.add_argument("--data-dir", help="the task's data folder (built-in image tasks: the IDX files; default: data/<task>)")
    p.add_argument("--config", help="YAML file of config sections (default: none)")
    p.add_argument("--resume", help="checkpoint (last.pt) to continue training from (default: none)")
    args, rest = p.parse_known_args(argv)
    empty = [name for name, value in vars(args).items() if value == ""]  # e.g. --config "$UNSET": not "no file"
    if empty:
        raise ConfigError(f"--{empty[0].replace('_', '-')} needs a value")
    flags = {"run": {k: v for k, v in {"out": args.out, "epochs": args.epochs, "seed": args.seed,
                                       "device": args.device, "precision": args.precision,
                                       "folds": args.folds}.items() if v is not None}}
    if args.data_dir is not None:
        flags["data"] = {"dir": args.data_dir}
    layers = []
    resume = None
    if args.resume:
        resume = load_checkpoint(args.resume)
        if not isinstance(resume.get("resume"), dict) or not isinstance(resume.get("config"), dict):
            raise CheckpointError(f"{args.resume} has no training state to resume from")
        args.task = resume_task(args.task, resume, args.resume)
        layers.append(resume["config"])
    if args.config:
        layers.append(load_yaml(args.config))
    overrides = parse_overrides(rest)
    layers += [overrides, flags]
    cfg = build_config(args.task, layers)
    cfg.run.out = str(cfg.out_dir)  # saved configs name their folder explicitly
    if resume is not None:
        check_resume(cfg, resume)
    return cfg, resume


def resume_task(given: str | None, resume: dict, path: str) -> str:
    """The --task of a resumed run: the one given, which must be the checkpoint's task, else the checkpoint's
    own if it is built in. A user's task is imported only when named on the command line."""
    name, ref = resume["task"], resume.get("task_ref")
    if given is None:
        if ref:
            raise ConfigError(f"{path} was trained on task {name}, not a built-in one; pass --task {ref} "
                              "(or wherever that task's file is now) to resume it")
        return name
    from train.config import resolve_task

    if resolve_task(given).name != name:
        raise ConfigError(f"--task {given} does not match the checkpoint's task {name}")
    return given


def check_resume(cfg: Config, resume: dict) -> None:
    """Refuse settings that a resumed run cannot honour, rather than silently ignoring them."""
    validate_checkpoint(resume, cfg.task, "the checkpoint")  # a user's task is known only now
    if cfg.run.max_seconds:
        raise ConfigError(f"--resume continues the checkpoint's {resume['config'].get('run', {}).get('epochs')} "
                          "planned epochs; run.max_seconds plans a new run: leave it out")
    if cfg.run.folds > 1:
        raise ConfigError(f"--resume continues one model, not {cfg.run.folds} folds; add --folds 1 to continue "
                          "this checkpoint alone")
    saved = resume["config"]
    for section in ("model", "optim", "sched"):
        # The checkpoint's weights, optimizer and scheduler state carry these settings and would
        # silently win over a new value (an lr override on resume used to be ignored).
        for key, value in cfg.to_dict()[section].items():
            if saved.get(section, {}).get(key, value) != value:
                raise ConfigError(f"{section}.{key} was {saved[section][key]!r} in the checkpoint; --resume "
                                  f"continues its model, optimizer and schedule: start a new run to change it")
    skip = saved.get("data", {}).get("skip_easiest", 0.0)
    if skip != cfg.data.skip_easiest:
        # The checkpoint's per-example losses and its schedule's length follow the fraction it trained with.
        raise ConfigError(f"data.skip_easiest was {skip!r} in the checkpoint; --resume continues its selection "
                          f"and schedule: start a new run to change it")
    if resume["epoch"] >= cfg.run.epochs:
        raise ConfigError(f"the checkpoint has already run {resume['epoch']} epochs; pass --epochs above that")
    planned = saved.get("run", {}).get("epochs")
    if cfg.sched.name in ("cosine", "onecycle") and planned != cfg.run.epochs:
        # Their state fixes the schedule's length: cosine would climb back up, onecycle fail mid-epoch.
        what = f"resume it with --epochs {planned}" if resume["epoch"] < planned else "the checkpoint finished it"
        raise ConfigError(f"sched.name {cfg.sched.name} was planned for {planned} epochs ({what}); "
                          f"start a new run to change its length")
    check_resume_state(cfg, resume)  # weights and optimizer state, before the run folder is touched


def run(cfg: Config, resume: dict | None = None) -> dict:
    """Train (one model, or K folds), test the best, write the run folder; returns the summary."""
    rt = setup(cfg.run.device, cfg.run.precision, regression=cfg.task.regression, threads=cfg.run.threads)
    out = cfg.out_dir
    try:
        if rt.is_main:
            print("config:\n  " + yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip().replace("\n", "\n  "))
            print(f"device: {rt.device} precision: {rt.precision} processes: {rt.world_size}", flush=True)
        data = load_task_data(cfg, rt.device)
        if resume is not None:
            check_resume_data(cfg, len(data.train_x), rt.world_size, resume)
        # the task's network on 2 training inputs: the shape its Output declares, before anything is written
        check_output_shape(cfg.task, cfg.arch, build_predictor(cfg.task, cfg.arch, cfg.model_fields).net,
                           tuple(t.cpu() for t in data.train_x.batch(slice(0, 2))))
        plan = None
        if cfg.run.max_seconds:  # before config.yaml, which then records the run as planned
            plan = plan_epochs(cfg, data, rt)
            print(plan.line(), flush=True)
            # config.yaml and the checkpoints describe a run that repeats exactly (and resumes): its epochs, no budget;
            # summary.json keeps the budget and the estimate.
            cfg.run.epochs, cfg.run.max_seconds = plan.epochs, 0.0
        if rt.is_main:  # only once the data is there: a run that cannot start leaves no folder behind
            out.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(out)  # left by a run killed mid-save; nothing saves here yet
            (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        # train_seconds runs from the data being ready to the end of training. It includes building
        # the model and the optimizer, and so the one-off import of torch._dynamo that creating any
        # torch.optim optimizer triggers, as the product reference script's clock does.
        if cfg.run.folds > 1:
            t0 = time.perf_counter()
            result, folds = _kfold(cfg, data, rt, out)
        else:
            log = _log(cfg, rt, out)  # opened first: starting TensorBoard's writer is not training
            t0 = time.perf_counter()
            try:
                result, folds = fit(cfg, data, rt, out, log, resume), None
            finally:
                log.close()
        train_seconds = time.perf_counter() - t0 + (plan.probe_s if plan else 0.0)  # the budget includes the timing
        summary = _finish(cfg, data, rt, out, result, train_seconds, folds, plan)
        # Leave together: a process that tore down its gloo connections while rank 0 was still writing
        # the run folder once aborted in a full test run ("terminate called without an active exception").
        barrier()
        return summary
    finally:
        teardown()


def _log(cfg: Config, rt: Runtime, out: Path) -> RunLog:
    return RunLog(out, rt.is_main, cfg.log.tensorboard, cfg.log.histograms, cfg.log.print_every, cfg.run.epochs)


def _kfold(cfg: Config, data: TaskData, rt: Runtime, out: Path) -> tuple[FitResult, dict]:
    """K models on K splits of the training + validation data; keeps the best fold's checkpoint."""
    k = cfg.run.folds
    x, y = join(data.train_x, data.val_x), torch.cat([data.train_y, data.val_y])
    if k > len(x):
        raise ConfigError(f"run.folds={k} is more than the {len(x)} training samples")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.run.seed)).to(y.device)
    parts = perm.tensor_split(k)
    results, values = [], []
    for i in range(k):
        train_idx = torch.cat([p for j, p in enumerate(parts) if j != i])
        fold_data = TaskData(x.select(train_idx), y[train_idx], x.select(parts[i]), y[parts[i]], data.test_x,
                             data.test_y, data.classes)
        fold_dir = out / f"fold{i + 1}"
        if rt.is_main:
            fold_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(fold_dir)
            print(f"fold {i + 1}/{k}: {len(train_idx)} training, {len(parts[i])} validation samples", flush=True)
        log = _log(cfg, rt, fold_dir)
        try:
            results.append(fit(cfg, fold_data, rt, fold_dir, log))
        finally:
            log.close()
        values.append(results[-1].best_metrics[cfg.stop.monitor])
    pick = max if cfg.stop.monitor == "accuracy" else min
    best = values.index(pick(values))
    if rt.is_main:  # the best fold's checkpoints become the run's
        for name in ("best.pt", "last.pt"):
            save_checkpoint(load_checkpoint(out / f"fold{best + 1}" / name, task=cfg.task), out / name)
    folds = {"k": k, "monitor": cfg.stop.monitor, "values": values, "mean": statistics.fmean(values),
             "std": statistics.stdev(values) if k > 1 else 0.0, "best_fold": best + 1}
    if rt.is_main:
        print(f"{k}-fold val_{cfg.stop.monitor}: mean {folds['mean']:.4g} std {folds['std']:.4g} "
              f"(best fold {best + 1})", flush=True)
    return results[best], folds


def _finish(cfg: Config, data: TaskData, rt: Runtime, out: Path, result: FitResult, train_seconds: float,
            folds: dict | None, plan: Plan | None = None) -> dict:
    regression = cfg.task.regression
    model = result.predictor
    n_cls = len(data.classes) if data.classes else 0
    test = evaluate(model, data.test_x, data.test_y, regression, cfg.data.eval_batch_size, rt, n_cls) \
        if cfg.run.test else None
    summary = {
        "task": cfg.task.name, "task_ref": None if is_builtin(cfg.task) else cfg.run.task, "arch": cfg.arch, "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
        "stopped": result.stopped, "train_seconds": round(train_seconds, 3), "device": str(rt.device),
        "precision": rt.precision, "processes": rt.world_size,
        # the machine the seconds were measured on: speed ratios from two CPU kinds are not comparable
        "cpu": cpu_info(), "gpu": torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else None,
        "channels_last": use_channels_last(cfg.run.channels_last, cfg.task, rt.device), "compile": cfg.run.compile,
        "val": scalars(result.best_metrics),
        "test": {k: v for k, v in test.items() if k != "confusion"} if test else None,
    }
    if folds:
        summary["folds"] = folds
    if plan:  # run.max_seconds: the budget, and the estimate that chose the epochs
        summary["budget"] = {"max_seconds": plan.max_seconds, "epochs": plan.epochs,
                             "step_seconds": round(plan.step_s, 6),
                             "first_epoch_seconds": round(plan.first_epoch_s, 3),
                             "later_epoch_seconds": round(plan.later_epoch_s, 3),
                             "timing_seconds": round(plan.probe_s, 3)}
    if not rt.is_main:
        return summary
    write_json(out / "summary.json", summary)
    if cfg.log.plots:
        from train import plots  # matplotlib costs ~0.4 s to import: only when plotting
        history = read_history(out) if folds is None else read_history(out / f"fold{folds['best_fold']}")
        if history:
            plots.loss_curves(history, out / "loss.png")
        if test and regression:  # both plots are of the test set
            pred = predict(model, data.test_x, cfg.data.eval_batch_size)
            plots.predicted_vs_true(data.test_y.cpu(), pred.cpu(), cfg.task.output, out / "predicted_vs_true.png")
        elif test:
            plots.confusion_matrix(test["confusion"], data.classes, out / "confusion.png")
    print(f"done: {result.epochs_run} epochs ({result.stopped}), best epoch {result.best_epoch}, "
          f"train {train_seconds:.2f}s; " + (f"test {fmt_metrics(summary['test'])}" if test else
                                                "test set not scored (run.test false)"), flush=True)
    print(f"wrote {out}/best.pt, last.pt, summary.json", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun
    where = f"rank {rank}: " if rank else ""  # under torchrun, an error may be one process's own
    cfg = None
    try:
        cfg, resume = parse_args(sys.argv[1:] if argv is None else argv)
        run(cfg, resume)
    except NonFiniteLossError as e:
        if rank == 0:  # every process sees the same reduced loss and stops with it: one line is enough
            saved = any(cfg.out_dir.glob("**/last.pt"))
            kept = "best.pt and last.pt keep the last finite epoch" if saved else "no epoch finished, nothing saved"
            print(f"error: {e}; stopped, {kept}", file=sys.stderr)
        return 1
    except USER_ERRORS as e:
        print(f"{where}error: {first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{where}error: interrupted; last.pt holds the last finished epoch", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as e:
        # Too large a model, batch or dataset for this machine: the CPU allocator raises a RuntimeError,
        # CUDA a torch.OutOfMemoryError (a RuntimeError). Any other RuntimeError is a bug: traceback.
        if not (isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e)):
            raise
        asked = re.search(r"tried to allocate [^.;(]*", str(e))
        print(f"{where}error: out of memory ({asked[0].strip() if asked else first_line(e)[:200]}); "
              "use a smaller model, batch or dataset", file=sys.stderr)
        return 2
    return 0
