"""Several trained Predictors of one task answering as one model: the usual way to buy accuracy with training time.

Separately trained networks make partly different mistakes, so the mean of their answers beats each of them;
networks trained together as one model do not gain the same way (they learn to depend on each other).
"""

import math

import torch
from torch import nn

from models import Predictor


class Ensemble(nn.Module):
    """Takes and returns what one member (a `Predictor`) does, so export, parity and serving treat it as one.

    Every output is the members' mean, but a classifier's target output: its logits are the log of the members'
    mean probabilities, so the answer's softmax is the averaged probabilities (an output that is the softmax of
    the logits stays exactly that) and its argmax is the averaged vote. Averaging raw logits instead would
    let one overconfident member decide."""

    def __init__(self, members: list[Predictor], classification: bool):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)
        self.classification = classification
        self.target_index = members[0].target_index

    @property
    def target_norm(self):  # the regression loss in `train.engine.evaluate` reads its scale; the members share it
        return self.members[0].target_norm

    def forward(self, *xs: torch.Tensor):
        answers = [m(*xs) for m in self.members]
        single = isinstance(answers[0], torch.Tensor)
        per_output = zip(*((a,) if single else tuple(a) for a in answers))
        out = tuple(self._combine(torch.stack(outs), i) for i, outs in enumerate(per_output))
        return out[0] if single else out

    def _combine(self, stacked: torch.Tensor, index: int) -> torch.Tensor:
        if self.classification and index == self.target_index:
            return torch.logsumexp(torch.log_softmax(stacked, dim=-1), dim=0) - math.log(len(self.members))
        return stacked.mean(0)

    def scored(self, out):
        """The target output of `forward`'s answer."""
        return out if isinstance(out, torch.Tensor) else out[self.target_index]

    def norm_stats(self, task) -> dict:
        """The members' standardization statistics: one set when they share it (trained on the same data)."""
        stats = [m.norm_stats(task) for m in self.members]
        return stats[0] if all(s == stats[0] for s in stats) else {"members": stats}
