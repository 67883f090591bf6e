"""A task's data as whole tensors kept on the training device.

`Task.data` returns raw-unit splits (tensors or Datasets); here they become checked tensors, and a
task without a validation split gets one held out of its training split. Datasets this small fit
on any device, so there is no per-sample DataLoader work: batches are index gathers on resident tensors.
"""

from dataclasses import dataclass

import torch

from t2d import DataError, DataOptions
from t2d.splits import Features, split_tensors
from train.config import Config


@dataclass
class TaskData:
    """Raw-unit tensors on the training device. x: every input of every sample (`t2d.splits.Features`); y:
    (N, outputs) float32 targets (regression) or (N,) int64 class indices."""

    train_x: Features
    train_y: torch.Tensor
    val_x: Features
    val_y: torch.Tensor
    test_x: Features | None  # None when run.test is false: no model sees the test split
    test_y: torch.Tensor | None
    classes: list[str] | None = None  # None for regression


def data_options(cfg: Config) -> DataOptions:
    return DataOptions.from_config(cfg.to_dict())


def load_task_data(cfg: Config, device: torch.device) -> TaskData:
    task = cfg.task
    splits = task.data(data_options(cfg))
    train_x, train_y = split_tensors(task, splits.train, "train")
    test_x, test_y = split_tensors(task, splits.test, "test") if cfg.run.test else (None, None)
    if splits.val is not None:
        val_x, val_y = split_tensors(task, splits.val, "val")
    else:  # held out of the training split, at random but the same for every run with this seed
        n = cfg.data.val_size
        if n >= len(train_x):
            raise DataError(f"data.val_size={n} leaves no training samples (there are {len(train_x)})")
        perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(cfg.run.seed))
        val_idx, train_idx = perm[:n], perm[n:].sort().values
        train_x, train_y, val_x, val_y = (train_x.select(train_idx), train_y[train_idx], train_x.select(val_idx),
                                          train_y[val_idx])
    classes = list(task.classes) if task.classes else None
    return TaskData(*(t if t is None else t.to(device) for t in (train_x, train_y, val_x, val_y, test_x, test_y)),
                    classes=classes)


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
