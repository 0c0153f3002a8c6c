"""EM, sample-wise error-minimizing noise (Huang et al., ICLR 2021): a min-min bi-level problem.

Per outer round: ``train_steps`` SGD steps on the surrogate with the current poisoned images, then
``pgd_steps`` sign-gradient steps of ``step_frac * eps`` (0.8/255 at 8/255) that *lower* the
surrogate's loss, for every image. Stops when the surrogate's accuracy on the poisoned images
exceeds ``stop_acc`` (99%) or after ``rounds``. Checkpointed after every round (``resume``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..params import Param
from ..tensors import augment_batch, crop_pad
from ._surrogate import ROUND_PARAMS, SURROGATE_PARAMS, SurrogateAttack, poisoned
from .base import register_attack


@register_attack("em", "error-minimizing noise: min-min with a surrogate (l_inf 8/255)")
class EM(SurrogateAttack):
    norm = "linf"
    norms = ("linf", "l2")
    default_eps: ClassVar[dict[str, float]] = {"linf": 8 / 255, "l2": 1.0}
    SMOKE: ClassVar[dict[str, Any]] = {
        "preset": "cpu", "surrogate": "tinycnn", "rounds": 1, "pgd_steps": 2, "train_steps": 2}
    PARAMS: ClassVar[dict[str, Param]] = {
        **SURROGATE_PARAMS,
        **ROUND_PARAMS,
        "stop_acc": Param(float, 99.0, "stop once the surrogate's accuracy on poisoned data exceeds this (%)", low=0),
        "augment": Param(bool, False, "random crop + flip in surrogate training and (differentiably) in noise steps"),
    }
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {},
        "cpu": {"surrogate": "smallcnn", "rounds": 40, "pgd_steps": 10, "step_frac": 0.2},
    }

    def _craft(self, x: np.ndarray, y: np.ndarray, num_classes: int) -> torch.Tensor:
        self.setup(x, y, num_classes)

        def train_loss(model: torch.nn.Module, idx: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
            model.train()
            return F.cross_entropy(model(self.view(poisoned(self.x[idx], delta[idx]))), self.y[idx])

        self.surrogate_, delta = self.run_min_min(train_loss, self.minimize_noise)
        return delta

    def view(self, xb: torch.Tensor) -> torch.Tensor:
        """What the surrogate sees: ``xb`` itself, or a random crop + flip of it with ``augment``."""
        if not self.params["augment"]:
            return xb
        return augment_batch(xb, crop_pad(xb.shape[-1]), True, self.gen)

    def minimize_noise(self, model: torch.nn.Module, delta: torch.Tensor) -> torch.Tensor:
        model.eval()
        step = self.step_size()
        for idx in self.batches(shuffle=False):
            xb, yb, db = self.x[idx], self.y[idx], delta[idx].clone()
            for _ in range(self.params["pgd_steps"]):
                db.requires_grad_(True)
                loss = F.cross_entropy(model(self.view(poisoned(xb, db))), yb)
                (g,) = torch.autograd.grad(loss, db)
                db = self.pgd_step(db.detach(), g, xb, step, descend=True)
            delta[idx] = db.detach()
        return delta
