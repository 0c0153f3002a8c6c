"""em-smooth: sample-wise error-minimizing noise that is smooth by construction, made to survive rate-limited
purification.

Rationale (issue 25; the "low-frequency" half of DUNE / FUSE, ICML'26, which spread a poison's energy where
squeezing and low-pass purifiers keep it): a rate-constrained auto-encoder such as D-VAE's stage 2 keeps the
low spatial frequencies of an image and drops the fine texture, and EM's noise (Huang et al., ICLR 2021) is
almost all fine texture (a sign pattern that changes from pixel to pixel). Here each image's perturbation has
one value per cell of a coarse grid and channel (``grid`` px cells: 7 x 7 on 28 px images, 8 x 8 on 32 px),
bilinearly upsampled to full size, so it lives in the band a reconstruction at a low rate still carries.

The optimisation is EM's min-min (:class:`~unpoison.attacks._parametrised.ParametrisedEM`: rounds of
``train_steps`` surrogate steps, then ``pgd_steps`` sign steps of ``step_frac * eps`` on the grid values that
lower the surrogate's loss; stops at ``stop_acc`` or after ``rounds``; checkpointed every round). The bound is
l_inf 8/255 as EM's: the grid values stay in [-eps, eps], and bilinear upsampling (``align_corners=False``)
makes every pixel a convex combination of them, so the upsampled field does too; the base class checks it
again on the stored uint8 images.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ..params import Param
from ._parametrised import ParametrisedEM, upsample
from .base import register_attack
from .em import EM


@register_attack("em-smooth", "error-minimizing noise on a coarse grid, bilinearly upsampled: smooth (l_inf 8/255)")
class EMSmooth(ParametrisedEM):
    norm = "linf"
    norms = ("linf",)
    default_eps: ClassVar[dict[str, float]] = {"linf": 8 / 255}
    SMOKE: ClassVar[dict[str, Any]] = dict(EM.SMOKE)
    PARAMS: ClassVar[dict[str, Param]] = {
        **EM.PARAMS,
        "grid": Param(int, 4, "grid cell side in pixels: ceil(H/grid) x ceil(W/grid) values per channel and image, "
                              "bilinearly upsampled", low=1),
    }
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"paper": {}, "cpu": dict(EM.PRESETS["cpu"])}

    def grid_shape(self) -> tuple[int, int]:
        """(gh, gw): the coarse grid's size (the image's own with ``grid`` 1)."""
        _, _, h, w = self.x.shape
        return math.ceil(h / self.params["grid"]), math.ceil(w / self.params["grid"])

    def init_theta(self) -> torch.Tensor:
        n, c = self.x.shape[:2]
        u = torch.rand((n, c, *self.grid_shape()), generator=self.cpu_gen) * 2 - 1
        return (u * self.eps_).to(self.device_)

    def expand(self, theta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return upsample(theta[idx], tuple(self.x.shape[-2:]))

    def after_rounds(self, theta: torch.Tensor) -> None:
        self.info_["grid"] = list(self.grid_shape())
