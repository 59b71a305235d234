"""Gradient diagnostics: the L2 norm of each weighted layer's weight gradient, in depth order.

Two kinds of record, both the gradient of the mean cross-entropy of one batch:
- at initialisation (step 0): one forward/backward on a fixed, seeded probe batch, before any update;
- at the end of every epoch: the mean over the epoch's last `last_steps` training steps of the norms of
  the gradients that training computed anyway, so a record costs a few norm reductions per step and
  no extra forward or backward pass.
Each record also carries first/last: the first layer's norm over the last layer's (the classifier's),
the number that collapses when gradients vanish on their way back to the input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from resnet_sweep.models import weighted_layers

# MLflow metric key per layer index; step 0 = init, step k = epoch k. Named to sort after val_acc and
# test_acc, so that a run page lists the accuracies first, not 20-100 of these.
NORM_KEY = "weight_grad/{:03d}"
RATIO_KEY = "grad_ratio_first_last"


class GradientNorms:
    """Collects per-layer weight-gradient norms of `model` during training (see module docstring)."""

    def __init__(self, model: nn.Module, last_steps: int = 5) -> None:
        self.names, layers = zip(*weighted_layers(model))
        self.weights = [m.weight for m in layers]
        self.last_steps = last_steps
        self._sum: torch.Tensor | None = None
        self._count = 0

    def _norms(self) -> torch.Tensor:
        # one stacked tensor, no host sync: cheap enough to run inside the training loop
        return torch.stack([w.grad.detach().float().norm() if w.grad is not None
                            else torch.zeros((), device=w.device) for w in self.weights])

    def at_init(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Norms at initialisation on the probe batch (x, y), in train mode as training will see it.

        Leaves the model as it found it: grads cleared, BatchNorm running statistics restored.
        """
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        model.train()
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        norms = self._norms()
        model.zero_grad(set_to_none=True)
        model.load_state_dict(buffers, strict=False)
        return self._record(norms)

    def wants(self, step: int, steps_per_epoch: int) -> bool:
        return step > steps_per_epoch - self.last_steps

    def observe(self) -> None:
        """Call after backward on a step that `wants` a look."""
        norms = self._norms()
        self._sum = norms if self._sum is None else self._sum + norms
        self._count += 1

    def epoch_end(self) -> dict[str, float]:
        if self._sum is None:
            return {}
        record = self._record(self._sum / self._count)
        self._sum, self._count = None, 0
        return record

    def _record(self, norms: torch.Tensor) -> dict[str, float]:
        values = norms.double().cpu().tolist()
        out = {NORM_KEY.format(i): v for i, v in enumerate(values)}
        out[RATIO_KEY] = values[0] / values[-1] if values[-1] > 0 else float("nan")
        return out
