"""run.max_seconds: how many epochs fit a training-time budget on this machine, decided before training starts.

A few training steps of a throwaway copy of the run's network are timed first, and each epoch's cost is estimated
from them: the first epoch takes every example, later ones only the hardest under data.skip_easiest, and each ends
with a validation pass, which is timed too. The run then plans that many epochs (never more than run.epochs), so a
one-cycle or cosine schedule still anneals to its end inside the budget. A clock that cut training off mid-schedule
would keep the weights of a high learning rate. The planned number goes into config.yaml, so `--epochs N` repeats
the run exactly, which a time-dependent schedule could not offer.
"""

import math
import time
from dataclasses import dataclass

import torch

from train.config import Config, ConfigError
from train.data import TaskData, batch_order
from train.engine import evaluate, loss_fn, train_epoch
from train.fit import prepare
from train.optim import build_optimizer
from train.runtime import Runtime
from train.select import HardExamples, steps_per_epoch

WARMUP_STEPS = 5  # a network's first steps allocate memory and choose kernels: slower than the rest
TIMED_STEPS = 30


@dataclass
class Plan:
    epochs: int
    step_s: float  # one training step
    first_epoch_s: float  # every example, then validation
    later_epoch_s: float  # the hardest examples only (data.skip_easiest), then validation
    probe_s: float  # the timing itself, which the budget includes
    max_seconds: float = 0.0  # the budget it was planned for

    def line(self) -> str:
        return (f"run.max_seconds {self.max_seconds:g}: {self.epochs} epochs fit (a step {1000 * self.step_s:.1f} ms; "
                f"epochs {self.first_epoch_s:.1f} s, then {self.later_epoch_s:.1f} s each, estimated; "
                f"{self.probe_s:.1f} s to time them)")


def plan_epochs(cfg: Config, data: TaskData, rt: Runtime) -> Plan:
    """Time training steps on a copy of the run's network and plan the most epochs that fit cfg.run.max_seconds.
    ConfigError when not even one epoch fits."""
    if rt.distributed:
        raise ConfigError("run.max_seconds plans one process's run; under torchrun set run.epochs instead")
    start = time.perf_counter()
    # prepare() seeds the RNG itself, as fit() does again after this, so timing changes none of the run's draws.
    predictor, x, y, channels_last = prepare(cfg, data, rt)
    task, regression = cfg.task, cfg.task.regression
    opt = build_optimizer(predictor.net.parameters(), cfg.optim, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type) if rt.precision == "fp16" else None
    loss_f = loss_fn(regression, cfg.optim.label_smoothing, predictor.target_index if len(task.outputs) > 1 else None)
    hard = HardExamples(len(x), cfg.data.skip_easiest, rt.device) if cfg.data.skip_easiest else None
    order = batch_order(len(x), cfg.data.batch_size, 1, cfg.run.seed, rt.rank, rt.world_size, rt.device,
                        sampler=not regression)
    n = min(WARMUP_STEPS + TIMED_STEPS, len(order))
    warm = min(WARMUP_STEPS, n - 1)

    def steps(batches) -> None:
        train_epoch(predictor.net, x, y, batches, loss_f, opt, None, rt, scaler, cfg.optim.clip_grad_norm, None,
                    None, hard, channels_last)

    if warm:
        steps(order[:warm])
    t = time.perf_counter()
    steps(order[warm:n])  # ends in .item(): the device has finished
    step_s = (time.perf_counter() - t) / (n - warm)
    t = time.perf_counter()
    evaluate(predictor, data.val_x, data.val_y, regression, cfg.data.eval_batch_size, rt,
             len(data.classes) if data.classes else 0)
    val_s = time.perf_counter() - t

    def epoch_steps(examples: int) -> int:
        return steps_per_epoch(examples, cfg.data.batch_size, rt.world_size, cfg.run.max_batches)

    full = epoch_steps(len(x))
    kept = epoch_steps(HardExamples.kept(len(x), cfg.data.skip_easiest)) if cfg.data.skip_easiest else full
    first, later = full * step_s + val_s, kept * step_s + val_s
    probe_s = time.perf_counter() - start
    left = cfg.run.max_seconds - probe_s - first
    if left < 0:
        raise ConfigError(f"run.max_seconds {cfg.run.max_seconds:g}: not even one epoch fits on this machine (about "
                          f"{first:.1f} s, after {probe_s:.1f} s of timing steps)")
    epochs = min(cfg.run.epochs, 1 + math.floor(left / later))
    return Plan(epochs, step_s, first, later, probe_s, cfg.run.max_seconds)
