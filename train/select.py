"""Which training examples an epoch trains on: all of them, or (`data.skip_easiest`) the hardest.

Selective training: the first epoch trains on every example and keeps each one's loss. Every later
epoch skips the `skip` fraction of the training set with the lowest loss when last trained on, and
trains on the rest, hardest first in no particular order (the batches are shuffled as usual). A
skipped example keeps its old loss, so as the trained ones' losses fall below it, it comes back.
Fashion-MNIST's trousers, bags and sandals are right from the first epoch; the compute goes to
shirts, pullovers and coats instead. With `skip` 0.5 an epoch costs about half a full one:
configs/fashion_mnist_cnn.yaml trains 10 epochs in ~113 s on 2 CPU cores, where full epochs would
fit 5-6 (BENCHMARKS.md). The losses are those of the training forward pass itself, so selecting
costs no extra pass.
"""

import math

import torch

from train.runtime import all_reduce_sum


class HardExamples:
    """The per-example losses, and the hardest examples to train on next."""

    def __init__(self, n: int, skip: float, device: torch.device):
        self.n = n
        self.keep = self.kept(n, skip)
        self.last = torch.full((n,), math.inf, device=device)  # never trained on: the hardest
        self._sum = torch.zeros(n, device=device)
        self._count = torch.zeros(n, device=device)

    @staticmethod
    def kept(n: int, skip: float) -> int:
        """Examples per epoch after the first."""
        return n - int(n * skip)

    def indices(self) -> torch.Tensor | None:
        """The sorted indices of the examples to train on next, or None for all of them (the first
        epoch, before any example has a loss)."""
        if torch.isinf(self.last).all():
            return None
        # Sorted, so that the order of equal losses in topk cannot change which batches follow.
        return self.last.topk(self.keep).indices.sort().values

    def record(self, idx: torch.Tensor, losses: torch.Tensor) -> None:
        """Note one batch's per-example losses (on the device: no sync per step)."""
        self._sum.index_add_(0, idx, losses.float())
        self._count.index_add_(0, idx, torch.ones_like(losses, dtype=torch.float32))

    def end_epoch(self) -> None:
        """Take the epoch's losses as every process saw them (torchrun: each trained on its own shard;
        an example a padded shard repeats gets its mean loss)."""
        sums = all_reduce_sum(torch.stack([self._sum, self._count]))
        seen = sums[1] > 0
        self.last[seen] = sums[0][seen] / sums[1][seen]
        self._sum.zero_()
        self._count.zero_()

    def state(self) -> dict:
        return {"last": self.last.cpu()}

    def load_state(self, state: dict) -> None:
        """Restore from a checkpoint's resume state; ValueError where it does not fit this training set."""
        last = state.get("last") if isinstance(state, dict) else None
        if not isinstance(last, torch.Tensor) or last.shape != (self.n,) or not last.is_floating_point():
            shape = list(last.shape) if isinstance(last, torch.Tensor) else type(last).__name__
            raise ValueError(f"its per-example losses are {shape}, not {self.n} floats for this training set")
        if torch.isnan(last).any() or (last < 0).any():
            raise ValueError("its per-example losses hold NaN or negative values")
        self.last.copy_(last)


def steps_per_epoch(n: int, global_batch: int, world_size: int, max_batches: int) -> int:
    """Batches each process takes for `n` examples (DistributedSampler pads them to a multiple of the
    number of processes), capped by run.max_batches."""
    steps = math.ceil(math.ceil(n / world_size) / (global_batch // world_size))
    return min(steps, max_batches) if max_batches else steps
