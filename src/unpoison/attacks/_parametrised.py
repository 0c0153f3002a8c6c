"""EM's min-min over the parameters of a perturbation family: what em-smooth, colorshift and em-adaptive share.

:class:`ParametrisedEM` runs EM's outer loop (:meth:`SurrogateAttack.run_min_min`: rounds of surrogate steps,
then noise steps, checkpointed every round for ``resume``) on a parameter tensor ``theta`` instead of the
full-size perturbation. A subclass says how ``theta`` starts (:meth:`init_theta`), how it becomes the
perturbation of images ``idx`` (:meth:`expand`, bounded by construction), how it is kept in its box
(:meth:`project_theta`) and, optionally, what the surrogate sees of a poisoned image (:meth:`seen`: the image
itself by default; a purifier's output for em-adaptive). The noise step is EM's: ``pgd_steps`` sign-gradient
steps of ``step_frac * eps`` that lower the surrogate's loss, the gradient summed over every image that
shares a parameter (all the images of a class for a class-wise ``theta``).

Pixels stay in [0, 1] by a straight-through clamp (forward: clamped; backward: identity), since a
perturbation built from shared parameters cannot be clipped per pixel the way EM's is, and torch's clamp
would pass no gradient at saturated pixels (half of Fashion-MNIST).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .em import EM


def st_clamp01(v: torch.Tensor) -> torch.Tensor:
    """``v`` clamped to [0, 1] going forward, the identity going backward (straight-through / BPDA)."""
    return v + (v.clamp(0, 1) - v).detach()


def st_levels(v: torch.Tensor) -> torch.Tensor:
    """``v`` clamped and rounded to whole grey levels (what a uint8 file stores) going forward, the identity
    going backward (BPDA for the rounding and the clamp)."""
    return v + (v.clamp(0, 1).mul(255).round().div(255) - v).detach()


def upsample(t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of a coarse ``... x gh x gw`` grid to ``hw`` (``align_corners=False``: every output is
    a convex combination of grid values, so a grid inside [-eps, eps] gives a field inside it)."""
    if tuple(t.shape[-2:]) == tuple(hw):
        return t
    return F.interpolate(t, size=hw, mode="bilinear", align_corners=False)


class ParametrisedEM(EM):
    """EM's min-min on ``theta``; see the module docstring for what a subclass provides."""

    # --- what a subclass provides --------------------------------------------------------------------
    def init_theta(self) -> torch.Tensor:
        raise NotImplementedError

    def expand(self, theta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The float NCHW perturbation of images ``idx`` (each value in [-eps, eps])."""
        raise NotImplementedError

    def project_theta(self, theta: torch.Tensor) -> torch.Tensor:
        return theta.clamp(-self.eps_, self.eps_)

    def seen(self, xp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """What the surrogate is given for the poisoned images ``xp`` (rows ``idx``), before augmentation."""
        return xp

    # --- the min-min ----------------------------------------------------------------------------------
    def _craft(self, x: np.ndarray, y: np.ndarray, num_classes: int) -> torch.Tensor:
        self.setup(x, y, num_classes)
        self.before_rounds()
        self.surrogate_, theta = self.run_min_min(self.train_loss, self.minimize_noise)
        self.after_rounds(theta)
        return self.expand_all(theta)

    def before_rounds(self) -> None:
        """Set-up after the data is on the device, before the first round."""

    def after_rounds(self, theta: torch.Tensor) -> None:
        """Record what the run found (``self.info_`` is set by :meth:`run_min_min` by now)."""

    def init_delta(self, random: bool = True) -> torch.Tensor:
        return self.init_theta()

    def poisoned_rows(self, theta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The poisoned images ``idx`` in [0, 1] (straight-through clamp)."""
        return st_clamp01(self.x[idx] + self.expand(theta, idx))

    def expand_all(self, theta: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(self.x)
        with torch.no_grad():
            for idx in self.batches(shuffle=False):
                out[idx] = self.expand(theta, idx)
        return out

    def loss_on(self, model: nn.Module, xp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The surrogate's cross-entropy on what it sees of the poisoned images ``xp`` (rows ``idx``)."""
        return F.cross_entropy(model(self.view(self.seen(xp, idx))), self.y[idx])

    def surrogate_loss(self, model: nn.Module, theta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return self.loss_on(model, self.poisoned_rows(theta, idx), idx)

    def train_loss(self, model: nn.Module, idx: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        model.train()
        return self.surrogate_loss(model, theta.detach(), idx)

    def minimize_noise(self, model: nn.Module, theta: torch.Tensor) -> torch.Tensor:
        """``pgd_steps`` sign steps on ``theta``, each from the gradient summed over every batch; a bar with the
        loss of the last step."""
        model.eval()
        step = self.step_size()
        batches = list(self.batches(shuffle=False))
        bar = self.bar(self.params["pgd_steps"] * len(batches), "noise steps")
        for _ in range(self.params["pgd_steps"]):
            t = theta.detach().requires_grad_(True)
            grad = torch.zeros_like(theta)
            tot = 0.0
            for idx in batches:
                loss = self.surrogate_loss(model, t, idx)
                (g,) = torch.autograd.grad(loss, t)
                grad += g
                tot += float(loss.detach()) * len(idx)
                bar.update(1)
            bar.set_postfix(loss=f"{tot / len(self.x):.4f}", **self.bar_extra())
            theta = self.project_theta(theta - step * grad.sign())
        bar.close()
        return theta.detach()

    def bar_extra(self) -> dict[str, object]:
        """More numbers for the noise-step bar."""
        return {}

    @torch.no_grad()
    def _eval(self, model: nn.Module, theta: torch.Tensor | None, labels: torch.Tensor | None) -> tuple[float, float]:
        """(accuracy %, mean cross-entropy) of ``model`` on what it sees of the poisoned images (``theta``) or on
        the clean images (``None``), without augmentation. The round's loss and accuracy (the same model and
        ``theta``, asked one after the other) take one pass: ``minimize_noise`` returns a new ``theta`` each
        round, so the held reference cannot match a later round."""
        memo = getattr(self, "_memo", None)
        if memo is not None and theta is not None and labels is None and memo[0] is model and memo[1] is theta:
            return memo[2]
        model.eval()
        labels = self.y if labels is None else labels
        correct, tot = 0, 0.0
        for idx in self.batches(shuffle=False):
            xb = self.x[idx] if theta is None else self.seen(self.poisoned_rows(theta, idx), idx)
            out = model(xb)
            correct += int((out.argmax(1) == labels[idx]).sum())
            tot += float(F.cross_entropy(out, labels[idx], reduction="sum"))
        res = (100.0 * correct / len(self.x), tot / len(self.x))
        if theta is not None and labels is None:
            self._memo = (model, theta, res)
        return res

    def accuracy(self, model: nn.Module, delta: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None) -> float:
        return self._eval(model, delta, labels)[0]

    def mean_loss(self, model: nn.Module, delta: torch.Tensor | None = None) -> float:
        return self._eval(model, delta, None)[1]
