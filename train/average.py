"""optim.ema: an exponential moving average of the weights, the model that validation, checkpoints and export see."""

import copy

import torch

from models import Predictor


class WeightAverage:
    """Keeps `averaged`, a copy of the predictor whose network's floating-point parameters and buffers (BatchNorm's
    running statistics too) follow the trained ones as an exponential moving average, updated after every optimizer
    step. The training steps never see it; evaluation and checkpoints use it instead of the trained weights.

    The average is bias-corrected as Adam's moments are: after n updates it is sum_k (1 - d) d^(n-k) w_k / (1 - d^n),
    the steps' weights alone. Started from the initial weights instead, it would keep d^n of them (2% after 2,000
    steps at d = 0.998); and TensorFlow's warm-up, a decay of min(d, (1 + n) / (10 + n)), would make every d above
    0.99 the same average in runs of a few thousand steps.
    """

    def __init__(self, predictor: Predictor, decay: float, steps: int = 0):
        self.decay, self.steps = decay, steps
        self.averaged = copy.deepcopy(predictor).eval()
        self.averaged.requires_grad_(False)
        live, kept = predictor.net.state_dict(), self.averaged.net.state_dict()
        # The same tensors as the modules hold (state_dict shares storage), fetched once: an update is one fused
        # lerp over all of them.
        names = [k for k, t in live.items() if t.is_floating_point()]
        self._live, self._kept = [live[k] for k in names], [kept[k] for k in names]
        self._live_other = [t for k, t in live.items() if not t.is_floating_point()]
        self._kept_other = [kept[k] for k, t in live.items() if not t.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """Fold the trained weights after one optimizer step into the average."""
        self.steps += 1
        # a_n = a_(n-1) + (w_n - a_(n-1)) (1 - d) / (1 - d^n): the recursion of the bias-corrected average
        torch._foreach_lerp_(self._kept, self._live, (1.0 - self.decay) / (1.0 - self.decay ** self.steps))

    @torch.no_grad()
    def model(self) -> Predictor:
        """The averaged predictor, ready to evaluate (its integer buffers, such as BatchNorm's batch count, copied
        from the trained network)."""
        for kept, live in zip(self._kept_other, self._live_other):
            kept.copy_(live)
        return self.averaged
