"""REM, robust error-minimizing noise (Fu et al., ICLR 2022): min over noise, min over model, max over rho.

Like EM, but the surrogate is trained adversarially: each of its ``train_steps`` SGD steps is taken
on ``aug(x + delta) + rho`` with ``rho`` an l_inf PGD attack of radius ``adv_radius`` (4/255,
``adv_steps`` steps). The noise then minimises the loss at the *worst* ``rho`` (re-attacked every
noise step), averaged over ``eot`` random augmentations (expectation over transformations). Stops at
``stop_acc`` surrogate accuracy on the poisoned data (without rho) or after ``rounds``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..params import Param
from ..tensors import augment_batch, crop_pad
from ._surrogate import ROUND_PARAMS, SURROGATE_PARAMS, SurrogateAttack, poisoned
from .base import register_attack


@register_attack("rem", "robust error-minimizing noise: EM against an adversarially trained surrogate (l_inf)")
class REM(SurrogateAttack):
    norm = "linf"
    norms = ("linf", "l2")
    default_eps: ClassVar[dict[str, float]] = {"linf": 8 / 255, "l2": 1.0}
    SMOKE: ClassVar[dict[str, Any]] = {
        "preset": "cpu", "surrogate": "tinycnn", "rounds": 1, "pgd_steps": 1, "train_steps": 2}
    PARAMS: ClassVar[dict[str, Param]] = {
        **SURROGATE_PARAMS,
        **ROUND_PARAMS,
        "train_steps": Param(int, 10, "adversarial surrogate SGD steps per round", low=0),
        "adv_radius": Param(float, 4 / 255, "radius rho_a of the inner l_inf adversarial perturbation", low=0),
        "adv_steps": Param(int, 10, "PGD steps of the inner maximisation", low=0),
        "eot": Param(int, 5, "augmentation samples averaged per noise step", low=1),
        "stop_acc": Param(float, 99.0, "stop once the surrogate's accuracy on poisoned data exceeds this (%)", low=0),
    }
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {},
        "cpu": {"surrogate": "smallcnn", "rounds": 20, "pgd_steps": 5, "step_frac": 0.25, "adv_steps": 2,
                "eot": 1},
    }

    def _craft(self, x: np.ndarray, y: np.ndarray, num_classes: int) -> torch.Tensor:
        self.setup(x, y, num_classes)
        self.pad = crop_pad(self.x.shape[-1])

        def train_loss(model: nn.Module, idx: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
            xb = augment_batch(poisoned(self.x[idx], delta[idx]), self.pad, True, self.gen)
            xa = xb + self.attack_rho(model, xb, self.y[idx])
            model.train()
            return F.cross_entropy(model(xa), self.y[idx])

        _, delta = self.run_min_min(train_loss, self.minimize_noise)
        return delta

    def attack_rho(self, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """The inner max: l_inf PGD of radius ``adv_radius`` against ``model`` (eval mode), detached."""
        r = self.params["adv_radius"]
        steps = self.params["adv_steps"]
        if r <= 0 or steps <= 0:
            return torch.zeros_like(xb)
        model.eval()
        xb = xb.detach()
        rho = (torch.rand(xb.shape, device=xb.device, generator=self.gen) * 2 - 1) * r
        rho = (xb + rho).clamp(0, 1) - xb
        step = 2.5 * r / steps
        for _ in range(steps):
            rho.requires_grad_(True)
            loss = F.cross_entropy(model(poisoned(xb, rho)), yb)
            (g,) = torch.autograd.grad(loss, rho)
            rho = ((rho.detach() + step * g.sign()).clamp(-r, r) + xb).clamp(0, 1) - xb
        return rho.detach()

    def minimize_noise(self, model: nn.Module, delta: torch.Tensor) -> torch.Tensor:
        step = self.step_size()
        for idx in self.batches(shuffle=False):
            xb, yb, db = self.x[idx], self.y[idx], delta[idx].clone()
            for _ in range(self.params["pgd_steps"]):
                grad = torch.zeros_like(db)
                for _ in range(max(1, self.params["eot"])):
                    # one shared crop/flip for the whole sum keeps the gradient aligned with delta's pixels
                    db.requires_grad_(True)
                    xa = augment_batch(poisoned(xb, db), self.pad, True, self.gen)
                    rho = self.attack_rho(model, xa.detach(), yb)
                    model.eval()
                    loss = F.cross_entropy(model(xa + rho), yb)
                    (g,) = torch.autograd.grad(loss, db)
                    grad += g
                    db = db.detach()
                db = self.pgd_step(db, grad, xb, step, descend=True)
            delta[idx] = db.detach()
        return delta
