"""NTGA, neural tangent generalization attack (Yuan & Wu, ICML 2021), in plain torch.

The original uses Google's ``neural-tangents`` (JAX). Its last release (0.6.5, 2023) pins a JAX of
its time and does not fit this package's torch stack, so this module computes the same kind of
surrogate itself: the closed-form *infinite-width* NTK of a fully connected ReLU network (``depth``
hidden layers, weight/bias variances ``w_var``/``b_var``; the arc-cosine recursion of Jacot et al.
and Arora et al.). That kernel is the infinite ensemble of such networks trained by gradient
descent, which is what "NTK ensemble surrogate" means in the paper. Kernel regression stands in for
training: ``f(V) = K(V, T) (K(T, T) + ridge * mean diag K)^-1 Y_T`` (the ridge plays the role of
NTGA's early-stopping time ``t``: both damp the small-eigenvalue directions).

The poison set is cut into random blocks of ``block_size`` (T); for each, ``val_size`` clean images
from elsewhere (V) are the "test" the attack wants to get wrong. Projected gradient ascent
(``pgd_steps`` sign steps of ``step_frac * eps``) on T's perturbation maximises the squared error
of f(V) against V's centred one-hot labels. Everything is differentiable torch, so the same code
runs on CPU and CUDA; the bounds are l_inf 8/255 as in the paper.
"""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from ..params import Param
from .base import Attack, project, register_attack, to_float_nchw


def relu_ntk(x1: torch.Tensor, x2: torch.Tensor, depth: int = 3, w_var: float = 2.0,
             b_var: float = 0.05) -> torch.Tensor:
    """Infinite-width NTK of an FC ReLU net between rows of ``x1`` (n x d) and ``x2`` (m x d)."""
    d = x1.shape[1]
    s12 = w_var * (x1 @ x2.T) / d + b_var
    s11 = w_var * (x1 * x1).sum(1) / d + b_var
    s22 = w_var * (x2 * x2).sum(1) / d + b_var
    theta = s12
    for _ in range(depth):
        norm = torch.sqrt(s11[:, None] * s22[None, :])
        rho = (s12 / norm).clamp(-1 + 1e-6, 1 - 1e-6)
        ang = torch.arccos(rho)
        nngp = w_var / (2 * math.pi) * norm * (torch.sin(ang) + (math.pi - ang) * rho) + b_var
        dot = w_var / (2 * math.pi) * (math.pi - ang)
        theta = theta * dot + nngp
        s12 = nngp
        s11 = w_var / 2 * s11 + b_var
        s22 = w_var / 2 * s22 + b_var
    return theta


@register_attack("ntga", "neural tangent generalization attack: infinite-width ReLU NTK, kernel regression (l_inf)")
class NTGA(Attack):
    norm = "linf"
    norms = ("linf", "l2")
    default_eps: ClassVar[dict[str, float]] = {"linf": 8 / 255, "l2": 1.0}
    uses_surrogate = True
    SMOKE: ClassVar[dict[str, Any]] = {"preset": "cpu", "block_size": 16, "val_size": 16, "pgd_steps": 2}
    PARAMS: ClassVar[dict[str, Param]] = {
        "block_size": Param(int, 4000, "images perturbed together (one kernel-regression training set)", low=1),
        "val_size": Param(int, 2000, "clean images the kernel regressor is scored on per block", low=0),
        "pgd_steps": Param(int, 10, "projected gradient steps per block", low=0),
        "step_frac": Param(float, 0.25, "step as a fraction of eps", low=0),
        "depth": Param(int, 3, "hidden layers of the FC ReLU network whose NTK is used", low=1),
        "ridge": Param(float, 0.01, "kernel ridge, relative to the mean kernel diagonal", low=0),
    }
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "paper": {},
        "cpu": {"block_size": 512, "val_size": 512},
    }

    def _craft(self, x: np.ndarray, y: np.ndarray, num_classes: int) -> torch.Tensor:
        dev = self.device_
        xf = to_float_nchw(x, dev)
        n = len(xf)
        yoh = torch.nn.functional.one_hot(torch.as_tensor(y, device=dev), num_classes).float() - 1.0 / num_classes
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(n, generator=g)
        bs = max(2, self.params["block_size"])
        delta = torch.zeros_like(xf)
        step = self.params["step_frac"] * self.eps_
        blocks = [perm[i:i + bs] for i in range(0, n, bs)]
        acc_clean, acc_pois = [], []
        t0 = time.perf_counter()

        bar = tqdm(blocks, desc="ntga: blocks", disable=not self.progress, leave=False, dynamic_ncols=True)
        for tb in bar:
            others = perm[~torch.isin(perm, tb)]
            pool = others if len(others) else tb
            vb = pool[torch.randperm(len(pool), generator=g)[: self.params["val_size"]]]
            xt, xv = xf[tb.to(dev)].flatten(1), xf[vb.to(dev)].flatten(1)
            yt, yv = yoh[tb.to(dev)], yoh[vb.to(dev)]
            d = torch.zeros_like(xt)
            acc_clean.append(self._val_acc(xt, xv, yt, yv))
            for _ in range(self.params["pgd_steps"]):
                d.requires_grad_(True)
                loss = ((self._predict(xt + d, xv, yt) - yv) ** 2).sum(1).mean()
                (grad,) = torch.autograd.grad(loss, d)
                d = d.detach() + (step * grad.sign() if self.norm_used == "linf"
                                  else step * grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12))
                d = project(d, self.norm_used, self.eps_)
                d = (xt + d).clamp(0, 1) - xt
            acc_pois.append(self._val_acc(xt + d, xv, yt, yv))
            delta[tb.to(dev)] = d.view(-1, *xf.shape[1:])
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", kr_val_acc=f"{acc_pois[-1]:.1f}")
        bar.close()
        self.info_ = {"surrogate": f"infinite-width FC-ReLU NTK, depth {self.params['depth']}",
                      "surrogate_val_acc_clean": float(np.mean(acc_clean)),
                      "surrogate_acc": float(np.mean(acc_pois)), "n_blocks": len(blocks),
                      "timings_s_pgd": time.perf_counter() - t0}
        return delta

    def _predict(self, xt: torch.Tensor, xv: torch.Tensor, yt: torch.Tensor) -> torch.Tensor:
        depth = self.params["depth"]
        ktt = relu_ntk(xt, xt, depth)
        kvt = relu_ntk(xv, xt, depth)
        lam = self.params["ridge"] * ktt.diagonal().mean()
        eye = torch.eye(len(xt), device=xt.device, dtype=ktt.dtype)
        return kvt @ torch.linalg.solve(ktt + lam * eye, yt)

    @torch.no_grad()
    def _val_acc(self, xt: torch.Tensor, xv: torch.Tensor, yt: torch.Tensor, yv: torch.Tensor) -> float:
        return float((self._predict(xt, xv, yt).argmax(1) == yv.argmax(1)).float().mean() * 100)
