"""Fit one model: the epoch loop with validation, scheduling, early stopping and checkpoints."""

import hashlib
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

import t2d
from models import Predictor, build_predictor
from models.checkpoint import CheckpointError, first_line, load_checkpoint, save_checkpoint, serialize, weights_problem
from train.config import Config, ConfigError
from t2d.splits import real_values
from train.average import WeightAverage
from train.data import Augment, TaskData, batch_order
from train.engine import NonFiniteLossError, evaluate, loss_fn, train_epoch
from train.optim import build_optimizer, build_scheduler, step_epoch
from train.report import RunLog, warn
from train.runtime import Runtime, broadcast_flag
from train.select import HardExamples, steps_per_epoch


@dataclass
class FitResult:
    predictor: Predictor  # holds the best epoch's weights
    best_epoch: int
    best_metrics: dict
    epochs_run: int
    stopped: str  # max_epochs | early_stopping | target
    history: list = field(default_factory=list)


@dataclass
class Stopper:
    """Tracks the monitored validation metric for best.pt and early stopping."""

    mode: str  # min | max
    min_delta: float
    best: float = math.nan
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record this epoch's value; True when it improves on the best by more than min_delta."""
        if math.isnan(self.best):
            improved = True
        elif self.mode == "min":
            improved = value < self.best - self.min_delta
        else:
            improved = value > self.best + self.min_delta
        if improved:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    def state(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}


def use_channels_last(setting: str, task, device: torch.device) -> bool:
    """Whether to train in channels_last: run.channels_last, with auto = image tasks on CPU (measured faster
    there, bench/train_step.py; not measured on CUDA or MPS)."""
    images = any(i.is_image for i in task.inputs)
    return images and (device.type == "cpu" if setting == "auto" else setting == "on")


def prepare(cfg: Config, data: TaskData, rt: Runtime, resume: dict | None = None):
    """The run's network with its initial (or resumed) weights and input statistics, on the device, and the
    standardized training split: (predictor, x_train, y_train, channels_last)."""
    task = cfg.task
    regression = task.regression
    torch.manual_seed(cfg.run.seed)  # the same initial weights in every process and every repeat
    predictor = build_predictor(task, cfg.arch, cfg.model_fields)
    if resume is not None:
        problem = weights_problem(resume["state_dict"], predictor.state_dict())  # its config vs its weights
        if problem:
            raise CheckpointError(f"the checkpoint's config does not describe its weights: {problem}")
        predictor.load_state_dict(resume["state_dict"])
    else:  # z-score statistics from the training split only
        whole = data.train_x.whole()
        for k, inp in enumerate(task.inputs):
            if inp.normalize != "none":
                if inp.variable:  # one mean and std over the real values, the padding left out
                    predictor.input_norms[str(k)].fit(real_values(whole, k).reshape(-1, 1))
                else:
                    predictor.input_norms[str(k)].fit(whole.tensors[k], dims=inp.stats_dims)
        if regression:
            predictor.target_norm.fit(data.train_y)
    predictor.to(rt.device)
    channels_last = use_channels_last(cfg.run.channels_last, task, rt.device)
    if channels_last:  # NHWC conv weights (a no-op for other layers); the batches follow in train_epoch
        predictor.net.to(memory_format=torch.channels_last)

    # Standardize the training split once; validation and test go through the raw-units predictor.
    with torch.no_grad():
        x_train = data.train_x.map(predictor.standardize)
        y_train = predictor.target_norm(data.train_y) if regression else data.train_y
    return predictor, x_train, y_train, channels_last


def fit(cfg: Config, data: TaskData, rt: Runtime, out_dir: Path, log: RunLog, resume: dict | None = None) -> FitResult:
    task = cfg.task
    regression = task.regression
    predictor, x_train, y_train, channels_last = prepare(cfg, data, rt, resume)
    if rt.distributed and rt.device.type == "cuda":
        # Batch statistics over the global batch, as one process would see them (gloo on CPU has no
        # SyncBatchNorm). Same parameters and buffers, so checkpoints load into plain BatchNorm.
        predictor.net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(predictor.net)
    average = None
    if cfg.optim.ema:  # from the loaded weights: a resumed run's checkpoint holds the average
        average = WeightAverage(predictor, cfg.optim.ema, resume["resume"].get("average_steps", 0) if resume else 0)
    trained = (resume or {}).get("resume", {}).get("training_weights")
    if trained is not None:  # the weights training had reached, behind the average it saved
        predictor.net.load_state_dict({k: v.to(rt.device) for k, v in trained.items()})
    net = predictor.net
    model = DistributedDataParallel(net, device_ids=[rt.device] if rt.device.type == "cuda" else None) \
        if rt.distributed else net
    if cfg.run.compile:  # shares net's parameters: the optimizer, checkpoints and evaluation see the eager module
        model = torch.compile(model)

    global_batch = cfg.data.batch_size
    if global_batch % rt.world_size:
        raise ConfigError(f"data.batch_size {global_batch} is not divisible by the {rt.world_size} processes")
    if rt.distributed and cfg.optim.name == "lbfgs":
        # Its line search branches on the loss of each process's own shard: the processes would take
        # different numbers of backward passes, and DDP's gradient all-reduces would wait forever.
        raise ConfigError("optim.name lbfgs runs in one process, not under torchrun")
    steps, total_steps = planned_steps(cfg, len(x_train), rt.world_size)
    hard = HardExamples(len(x_train), cfg.data.skip_easiest, rt.device) if cfg.data.skip_easiest else None
    opt = build_optimizer(net.parameters(), cfg.optim, rt.device)
    mode = "max" if cfg.stop.monitor == "accuracy" else "min"
    sched = build_scheduler(opt, cfg.sched, cfg.run.epochs, steps, mode, total_steps)
    scaler = torch.amp.GradScaler(rt.device.type) if rt.precision == "fp16" else None
    augment = None
    if task.image_input and (cfg.data.crop_padding or cfg.data.hflip):
        # A 0 pixel, standardized: the padding of crops (of the first channel, where each has its own statistics).
        black = float(predictor.input_norms["0"](torch.zeros(1, device=rt.device)).flatten()[0].item())
        augment = Augment(cfg.data.crop_padding, cfg.data.hflip, black)
    stopper = Stopper(mode, cfg.stop.min_delta)
    start = 0
    if resume is not None:
        stopper = load_training_state(resume["resume"], opt, sched, scaler, stopper, hard)
        start = resume["epoch"]

    # Each sample's largest varying size, for data.group_by_length.
    sizes = torch.stack(list(data.train_x.lengths.values())).amax(0) if cfg.data.group_by_length else None
    loss_f = loss_fn(regression, cfg.optim.label_smoothing, predictor.target_index if len(task.outputs) > 1 else None)
    best_state = copy_tensors((average.model() if average else predictor).state_dict())
    best_metrics: dict = dict(resume.get("metrics", {})) if resume else {}
    kept_epoch = start if cfg.stop.keep == "last" else stopper.best_epoch
    if resume is not None and kept_epoch != start:
        # The best epoch came before the resumed one: its weights and metrics are in best.pt, not last.pt.
        best_ckpt = load_checkpoint(out_dir / "best.pt", task=task) if (out_dir / "best.pt").is_file() else None
        if best_ckpt is not None and best_ckpt["epoch"] == stopper.best_epoch:
            best_state, best_metrics = best_ckpt["state_dict"], dict(best_ckpt.get("metrics", {}))
        else:
            kept_epoch = start
            if rt.is_main:
                warn(f"no best.pt of epoch {stopper.best_epoch} in {out_dir}; "
                     "the test uses the resumed weights unless a later epoch improves")
    stopped, epoch = "max_epochs", start
    num_classes = len(data.classes) if data.classes else 0
    config = cfg.to_dict()  # fixed for the whole fit: built once, not every epoch
    with CheckpointSaver(out_dir, cfg.log.checkpoint_every_s) as saver:
        for epoch in range(start + 1, cfg.run.epochs + 1):
            t0 = time.perf_counter()
            reseed(epoch_seed(cfg.run.seed, epoch, rt.rank), rt.device)  # dropout and augmentation draws
            lr = opt.param_groups[0]["lr"]  # the rate this epoch starts with (before its scheduler step)
            chosen = hard.indices() if hard else None  # None: every example
            batches = batch_order(len(x_train) if chosen is None else len(chosen), global_batch, epoch, cfg.run.seed,
                                  rt.rank, rt.world_size, rt.device, sampler=not regression)
            if chosen is not None:
                batches = [chosen[b] for b in batches]
            if cfg.data.group_by_length:
                batches = group_by_length(batches, sizes, cfg.run.seed + epoch)
            train_loss = train_epoch(model, x_train, y_train, batches[:steps], loss_f, opt, sched, rt, scaler,
                                     cfg.optim.clip_grad_norm, augment,
                                     f"epoch {epoch}" if cfg.log.progress and rt.is_main and steps >= 100 else None,
                                     hard, channels_last, average)
            if hard:
                hard.end_epoch()
            scored = average.model() if average else predictor  # what validation, best.pt and the test see
            val = evaluate(scored, data.val_x, data.val_y, regression, cfg.data.eval_batch_size, rt, num_classes)
            if not math.isfinite(val["loss"]):  # the epoch's last steps broke the weights: save nothing
                raise NonFiniteLossError(f"validation loss became {val['loss']}")
            step_epoch(sched, val[cfg.stop.monitor])
            improved = stopper.update(val[cfg.stop.monitor], epoch)
            keep = improved or cfg.stop.keep == "last"
            if keep:  # a clone, not copy.deepcopy: 1 ms less per improvement of a product epoch (measured)
                best_state, best_metrics, kept_epoch = copy_tensors(scored.state_dict()), val, epoch
            if rt.is_main:
                behind = {"training_weights": predictor.net.state_dict(), "average_steps": average.steps} \
                    if average else {}
                saver.epoch(_payload(cfg, config, scored, epoch, val, opt, sched, scaler, stopper, hard, behind), keep)
            log.epoch(epoch, train_loss, val, lr, time.perf_counter() - t0, net, keep)
            stop = ("early_stopping" if cfg.stop.patience and stopper.bad_epochs >= cfg.stop.patience
                    else "target" if cfg.stop.target and val["loss"] <= cfg.stop.target else "")
            # Every process has the same reduced metrics; rank 0's word still decides, so that no process
            # can leave the loop while another waits for it in a collective.
            if broadcast_flag(bool(stop), rt.device):
                stopped = stop or "early_stopping"
                break
    predictor.load_state_dict(best_state)
    return FitResult(predictor.eval(), kept_epoch, best_metrics, epoch, stopped)


GROUP_BATCHES = 50  # data.group_by_length sorts this many batches' samples at a time: similar sizes, still shuffled


def group_by_length(batches: list[torch.Tensor], sizes: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """The same samples in batches of the same sizes, but each run of GROUP_BATCHES batches sorted by sample size
    and the batches then shuffled (seeded), so that a batch pads its samples little."""
    counts = [len(b) for b in batches]
    grouped = []
    for i in range(0, len(batches), GROUP_BATCHES):
        idx = torch.cat(batches[i:i + GROUP_BATCHES])
        idx = idx[torch.sort(sizes[idx], stable=True).indices]
        grouped += list(idx.split(counts[i:i + GROUP_BATCHES]))
    order = torch.randperm(len(grouped), generator=torch.Generator().manual_seed(seed)).tolist()
    return [grouped[k] for k in order]


def check_output_shape(task: t2d.Task, arch: str, net: torch.nn.Module, xs: tuple[torch.Tensor, ...]) -> None:
    """ConfigError unless the network maps a batch of training inputs to the task's outputs, each (batch, *shape):
    a regression net returning (B,) against targets (B, 1) would otherwise train on a silently broadcast (B, B)
    loss. Run in eval mode, so that BatchNorm's running statistics and the RNG are left as they were."""
    was_training = net.training
    n = len(xs[0])
    with torch.no_grad():
        out = net.eval()(*xs)  # (2, *input shapes) -> outputs
    net.train(was_training)
    outs = (out,) if isinstance(out, torch.Tensor) else tuple(out) if isinstance(out, (tuple, list)) else None
    if outs is None or len(outs) != len(task.outputs) or not all(isinstance(o, torch.Tensor) for o in outs):
        got = type(out).__name__ if outs is None else f"{len(outs)} value(s)"
        raise ConfigError(f"task {task.name}'s network {arch} returns {got}; the task declares "
                          f"{len(task.outputs)} output(s) {[o.name for o in task.outputs]}: return a tensor for one, "
                          f"a tuple in that order for several")
    for o, got in zip(task.outputs, outs):
        want = [n, *o.shape]
        ok = got.dim() == len(want) and all(w is None or g == w for g, w in zip(got.shape, want))
        if not ok:
            raise ConfigError(f"task {task.name}'s network {arch} maps a batch of {n} inputs to shape "
                              f"{list(got.shape)}{'' if len(outs) == 1 else f' for output {o.name}'}; its Output "
                              f"{o.name} needs {[('n' if w is None else w) for w in want]}")


def check_resume_state(cfg: Config, resume: dict) -> None:
    """Refuse, before a run writes anything, a resume checkpoint whose weights or optimizer state do not
    fit the model its config describes: `fit` loads the same state into the same model and optimizer."""
    predictor = build_predictor(cfg.task, cfg.arch, cfg.model_fields)
    problem = weights_problem(resume["state_dict"], predictor.state_dict())
    trained = resume["resume"].get("training_weights")  # optim.ema: the trained weights behind the average
    if not problem and trained is not None:
        problem = weights_problem(trained, predictor.net.state_dict())
    if problem:
        raise CheckpointError(f"the checkpoint's config does not describe its weights: {problem}")
    opt = build_optimizer(predictor.net.parameters(), cfg.optim, torch.device("cpu"))
    load_training_state(resume["resume"], opt, None, None, Stopper("min", 0.0))


def planned_steps(cfg: Config, n_train: int, world_size: int) -> tuple[int, int]:
    """Batches per full epoch, and in the whole run (selective training: the first epoch takes every
    example, the later ones the hardest `keep`)."""
    steps = steps_per_epoch(n_train, cfg.data.batch_size, world_size, cfg.run.max_batches)
    if not cfg.data.skip_easiest:
        return steps, cfg.run.epochs * steps
    keep = HardExamples.kept(n_train, cfg.data.skip_easiest)
    return steps, steps + (cfg.run.epochs - 1) * steps_per_epoch(keep, cfg.data.batch_size, world_size,
                                                                 cfg.run.max_batches)


def check_resume_data(cfg: Config, n_train: int, world_size: int, resume: dict) -> None:
    """Refuse, before a run writes anything, a checkpoint whose training state does not fit this training
    set: its size depends on the data folder, so this waits for the data."""
    if cfg.data.skip_easiest:
        try:
            HardExamples(n_train, cfg.data.skip_easiest, torch.device("cpu")).load_state(
                resume["resume"].get("hard_examples"))
        except ValueError as e:
            raise CheckpointError(f"the checkpoint's training state does not fit this training set: {e}") from None
    if cfg.sched.name != "onecycle":
        return
    saved = (resume["resume"].get("scheduler") or {}).get("total_steps")
    total = planned_steps(cfg, n_train, world_size)[1]
    if saved is not None and saved != total:
        # The restored schedule would end early (OneCycleLR then fails mid-epoch) or never anneal.
        raise ConfigError(f"sched.name onecycle was planned for {saved} steps, and this run takes {total} "
                          "(another data.batch_size, run.max_batches, training set or number of processes); "
                          "start a new run to change them")


def load_training_state(state: dict, opt, sched, scaler, stopper: Stopper, hard: HardExamples | None = None
                        ) -> Stopper:
    """Restore the optimizer, scheduler, grad-scaler and early-stopping state of a resumed checkpoint.

    Raises CheckpointError where that state does not fit this model: torch's load_state_dict checks
    only the number of parameters, so a wrongly shaped moment buffer would fail at the first step.
    """
    try:
        opt.load_state_dict(state["optimizer"])
        check_optimizer_state(opt)
        if sched is not None and state.get("scheduler"):
            sched.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if hard is not None:
            hard.load_state(state.get("hard_examples"))
        return Stopper(stopper.mode, stopper.min_delta, **state["stopper"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise CheckpointError(f"the checkpoint's training state does not fit its model: {first_line(e)}") from None


def check_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Every per-parameter state tensor must have its parameter's shape (L-BFGS: the flat length of all
    parameters), or be a scalar such as Adam's step count."""
    params = [p for group in opt.param_groups for p in group["params"]]
    flat = torch.Size([sum(p.numel() for p in params)])
    for i, p in enumerate(params):
        allowed = (p.shape, flat) if isinstance(opt, torch.optim.LBFGS) else (p.shape,)
        values = list(opt.state.get(p, {}).items())
        while values:
            name, v = values.pop()
            if isinstance(v, (list, tuple)):  # L-BFGS keeps its history as lists of tensors
                values += [(name, x) for x in v]
            elif isinstance(v, torch.Tensor) and v.dim() and v.shape not in allowed:
                raise ValueError(f"optimizer state {name} of parameter {i} has shape {list(v.shape)}, "
                                 f"the parameter's is {list(p.shape)}")


class CheckpointSaver:
    """Writes last.pt and best.pt at most every `every_s` seconds, and always when the fit ends.

    Serializing a checkpoint costs 3-10 ms (pickling the optimizer state and the config; LBFGS's
    history is the largest), as much as a whole product epoch: configs/product.yaml's 1000 epochs
    trained in 13.7 s saving every epoch, in 7.7 s saving every 5 s, to the same weights (measured,
    one thread on the busy 2-core machine). Between writes, the newest epoch and, when it is newer
    than best.pt, the best epoch wait in memory as copies (a few KB for the product MLP), and leaving
    the `with` block writes them, also when the fit stops on an error (a NaN loss, Ctrl-C): last.pt
    is then the last finished epoch and best.pt the best one, as with a write every epoch. Only a
    hard kill (or power loss) loses up to `every_s` seconds of epochs. `every_s` 0 writes every epoch.
    """

    def __init__(self, out_dir: Path, every_s: float):
        self.out_dir, self.every_s = out_dir, every_s
        self.writer = CheckpointWriter()
        self.written_at = time.perf_counter()  # the first write comes `every_s` after the start, or at the end
        self.last: dict | None = None  # payloads not yet written
        self.best: dict | None = None

    def epoch(self, payload: dict, improved: bool) -> None:
        """Save this epoch's checkpoint (`improved`: it is also the new best) now or at the next write."""
        if time.perf_counter() - self.written_at >= self.every_s:
            self.last = payload  # serialized right away: no copy needed
            if improved:
                self.best = payload
            self.flush()
        else:
            payload = copy_tensors(payload)  # the live weights and optimizer state change with the next step
            self.last = payload
            if improved:
                self.best = payload

    def flush(self) -> None:
        last, best = self.out_dir / "last.pt", self.out_dir / "best.pt"
        jobs = []
        if self.last is not None:
            same = self.best is self.last  # one serialization for both files
            jobs.append((serialize(self.last), [last, best] if same else [last]))
            if self.best is not None and not same:
                jobs.append((serialize(self.best), [best]))
        if jobs:
            self.writer.write(jobs)
        self.last = self.best = None
        self.written_at = time.perf_counter()

    def __enter__(self) -> "CheckpointSaver":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.flush()  # what training finished is saved, whatever stopped it
        finally:
            self.writer.close()


class CheckpointWriter:
    """Writes checkpoint bytes on one background thread, one batch of files at a time.

    fsync waits on the disk (1-4 ms per file here): writing in the background keeps that wait off
    the training thread. `close` waits for the last write; a write error surfaces at the next write
    or at the close.
    """

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future | None = None

    def write(self, jobs: list[tuple[bytes, list[Path]]]) -> None:
        """Write each (data, paths) job's bytes to its paths."""
        self.wait()
        self._pending = self._pool.submit(lambda: [save_checkpoint(data, p) for data, paths in jobs for p in paths])

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # re-raises the write's error here

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown()


def map_tensors(obj, fn):
    """`obj` with `fn` applied to every tensor in its dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
    return obj


def copy_tensors(obj):
    """`obj` with every tensor cloned (detached): a snapshot that later training steps leave alone.
    Much cheaper than copy.deepcopy for state dicts."""
    return map_tensors(obj, lambda t: t.detach().clone())


def on_cpu(obj):
    """`obj` with every tensor on the CPU (the same tensors where they already are)."""
    return map_tensors(obj, lambda t: t.detach().cpu())


def _payload(cfg: Config, config: dict, predictor: Predictor, epoch: int, metrics: dict, opt, sched,
             scaler, stopper: Stopper, hard: HardExamples | None, behind: dict | None = None) -> dict:
    """A self-describing checkpoint: the model alone rebuilds from it; the rest resumes training. With optim.ema,
    `predictor` is the average (the model), and `behind` holds the weights the optimizer steps, to resume."""
    task = cfg.task
    return {
        "task": task.name,
        # A user's task: where its code was found, so that export can say which --task to pass (it never
        # imports code because a checkpoint names it).
        "task_ref": None if t2d.is_builtin(task) else cfg.run.task,
        "kind": task.kind,
        "arch": cfg.arch,
        "model_config": cfg.model_fields,
        # contiguous: the file is the same whatever layout training ran in (run.channels_last)
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in predictor.state_dict().items()},
        "normalization": predictor.norm_stats(task),
        "inputs": [{"name": i.name, "dtype": i.dtype, "shape": list(i.shape)} for i in task.inputs],
        "classes": list(task.classes) if task.classes else None,
        "metrics": metrics,
        "epoch": epoch,
        "config": config,
        "torch_version": str(torch.__version__),  # TorchVersion would fail weights_only loads
        # On the CPU as the weights are, so the file loads without map_location on a machine with no GPU
        # (torch puts optimizer state back on its parameters' device when it is loaded for --resume).
        "resume": on_cpu({
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict() if sched is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "stopper": stopper.state(),
            "hard_examples": hard.state() if hard is not None else None,
            **(behind or {}),
        }),
    }


def reseed(seed: int, device: torch.device) -> None:
    """torch.manual_seed for the generators training uses; manual_seed itself also seeds every
    accelerator backend, which took 0.17 ms, a share of a product epoch worth saving."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    elif device.type == "mps":
        torch.mps.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of torch's generators for one epoch of one process.

    Reseeding every epoch from (seed, epoch, rank) makes the random draws of training (dropout,
    augmentation) a function of those three numbers: `--resume` restores them exactly from the
    checkpoint's config and epoch, whatever the number of processes, and each process of a
    torchrun job draws its own masks and crops.
    """
    digest = hashlib.blake2b(f"{seed}/{epoch}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # below 2**63: any torch seed
