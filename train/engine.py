"""The training step, the epoch loop and evaluation: plain functions with explicit arguments."""

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models import Predictor
from t2d.splits import Features
from train.data import Augment
from train.optim import steps_per_batch
from train.runtime import Runtime, all_reduce_sum
from train.select import HardExamples


class NonFiniteLossError(Exception):
    """The training loss became NaN or inf."""


def loss_fn(regression: bool, label_smoothing: float = 0.0, target_index: int | None = None):
    """The training loss. Classifiers: cross-entropy against targets that put `label_smoothing`
    of their mass evenly on all classes (validation and test report the plain cross-entropy). A network with
    several outputs is scored on its `target_index`-th."""
    loss = F.mse_loss if regression else (functools.partial(F.cross_entropy, label_smoothing=label_smoothing)
                                          if label_smoothing else F.cross_entropy)
    if target_index is None:
        return loss
    return lambda out, y, **kw: loss(out if isinstance(out, torch.Tensor) else out[target_index], y, **kw)


def train_step(net: nn.Module, xb: tuple[torch.Tensor, ...], yb: torch.Tensor, loss_f, opt: torch.optim.Optimizer,
               rt: Runtime, scaler: torch.amp.GradScaler | None, clip: float, per_sample: bool = False
               ) -> torch.Tensor:
    """One optimizer step on one batch (`xb`: the inputs, in the network's order); returns the batch loss, or with
    `per_sample` each example's
    loss (a detached tensor, no device sync). L-BFGS takes the whole set in one batch: no per_sample."""
    if isinstance(opt, torch.optim.LBFGS):
        # LBFGS evaluates the loss and gradients again and again within one step (its iterations and
        # line search), so it takes them as a closure; it returns the loss before its first update.
        def closure() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            with rt.autocast():
                loss = loss_f(net(*xb), yb)
            loss.backward()
            return loss

        return opt.step(closure).detach()
    opt.zero_grad(set_to_none=True)
    with rt.autocast():
        losses = loss_f(net(*xb), yb, reduction="none" if per_sample else "mean")
    loss = losses.mean() if per_sample else losses
    if scaler is not None:  # fp16: scale the loss so small gradients survive half precision
        scaler.scale(loss).backward()
        if clip > 0:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(net.parameters(), clip)
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        if clip > 0:
            nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
    return losses.detach().reshape(len(losses), -1).mean(1) if per_sample else loss.detach()


def train_epoch(net: nn.Module, x: Features, y: torch.Tensor, batches: list[torch.Tensor], loss_f,
                opt: torch.optim.Optimizer, scheduler, rt: Runtime, scaler, clip: float,
                augment: Augment | None, progress: str | None, hard: HardExamples | None = None,
                channels_last: bool = False, average=None) -> float:
    """One pass over `batches` (index tensors into the standardized x, y); returns the mean loss over all
    ranks. `hard` (data.skip_easiest) gets every example's loss; `channels_last` lays out image batches
    (4-D inputs) as the network's weights are; `average` (optim.ema, a train.average.WeightAverage) takes in
    the weights after every step."""
    net.train()
    total = torch.zeros((), device=y.device, dtype=torch.float64)
    count = 0
    for idx in tqdm(batches, desc=progress, leave=False, disable=None if progress else True):
        xb, yb = x.batch(idx), y[idx]
        if augment is not None and augment.active:
            xb = (augment(xb[0]),)  # an image task's one input
        if channels_last:
            xb = tuple(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in xb)
        # Summed on the device: a .item() per step would stall the GPU on every batch.
        loss = train_step(net, xb, yb, loss_f, opt, rt, scaler, clip, per_sample=hard is not None)
        if average is not None:
            average.update()
        if hard is not None:
            hard.record(idx, loss)
            loss = loss.mean()
        total += loss * len(idx)
        count += len(idx)
        if scheduler is not None and steps_per_batch(scheduler):
            scheduler.step()
    sums = all_reduce_sum(torch.stack([total, torch.tensor(float(count), device=y.device, dtype=torch.float64)]))
    loss = (sums[0] / sums[1]).item()
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"training loss became {loss}")
    return loss


@torch.no_grad()
def evaluate(model: Predictor, x: Features, y: torch.Tensor, regression: bool, batch_size: int,
             rt: Runtime, num_classes: int = 10, shard: bool = True) -> dict:
    """Metrics of the raw-units `model` on (x, y), in raw units, reduced over all processes.

    Each process evaluates its own shard (every world_size-th sample) and the float64 sums are added
    up, so the result is the single-process one up to rounding (a float32 forward pass may round a
    sample's output differently in a batch of another size: 1 ulp, measured). Regression: loss (MSE of
    the standardized target, as in training), mse, mae, mre (%), each over every target value;
    classification: loss, accuracy (%), per_class accuracy, confusion.
    """
    model.eval()
    if shard and rt.distributed:
        x, y = x.select(torch.arange(rt.rank, len(x), rt.world_size, device=y.device)), y[rt.rank::rt.world_size]
    dev = y.device
    if regression:
        sums = torch.zeros(5, device=dev, dtype=torch.float64)  # sq_norm, sq, abs, rel, count
        std = model.target_norm.std.double()
        for i in range(0, len(x), batch_size):
            pred, true = model.scored(model(*x.batch(slice(i, i + batch_size)))).double(), y[i:i + batch_size].double()
            err = pred - true
            sums += torch.stack([((err / std) ** 2).sum(), (err ** 2).sum(), err.abs().sum(),
                                 (err.abs() / true.abs()).sum(), torch.tensor(float(err.numel()), device=dev)])
        s = all_reduce_sum(sums).tolist()
        n = s[4]
        return {"loss": s[0] / n, "mse": s[1] / n, "mae": s[2] / n, "mre": 100 * s[3] / n}
    loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
    confusion = torch.zeros(num_classes, num_classes, device=dev, dtype=torch.int64)  # [true, predicted]
    for i in range(0, len(x), batch_size):
        with rt.autocast():
            logits = model.scored(model(*x.batch(slice(i, i + batch_size))))
        true = y[i:i + batch_size]
        loss_sum += F.cross_entropy(logits.float(), true, reduction="sum").double()
        confusion += torch.bincount(true * num_classes + logits.argmax(1), minlength=num_classes ** 2).view(
            num_classes, num_classes)
    loss_sum, confusion = all_reduce_sum(loss_sum), all_reduce_sum(confusion)
    n = confusion.sum().item()
    per_class = (confusion.diag().double() / confusion.sum(1).clamp(min=1).double() * 100).tolist()
    return {"loss": loss_sum.item() / n, "accuracy": 100 * confusion.diag().sum().item() / n,
            "per_class": per_class, "confusion": confusion.tolist()}


@torch.no_grad()
def predict(model: Predictor, x: Features, batch_size: int) -> torch.Tensor:
    """Raw-unit predictions of the target output for all of x (on the main process; for plots)."""
    model.eval()
    return torch.cat([model.scored(model(*x.batch(slice(i, i + batch_size)))).float()
                      for i in range(0, len(x), batch_size)])
