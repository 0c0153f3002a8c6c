"""colorshift: a colour / intensity shift poison, per class (default) or per image: the colour half of DUNE's
design (ICML'26: spatial and colour perturbations built to survive squeezing and low-pass purifiers).

Each channel gets an affine map of its intensity, ``x' = x + (1 - x) * s0 + x * s1``: ``s0`` is the shift of a
black pixel and ``s1`` of a white one, so the map is a gain ``1 + s1 - s0`` and an offset ``s0``, and every
pixel moves by a convex combination of the two. With ``grid`` > 1 the two shifts are given on a coarse
``grid x grid`` lattice and bilinearly upsampled (a smooth spatial gain and offset: 2 x 2 by default);
``grid = 1`` is one gain and one offset per channel. ``s0, s1`` in [-eps, eps] keep every change within l_inf
``eps`` (8/255) before the clip to [0, 1]; the base class checks the bound on the stored uint8 images.

How the shifts are chosen (``search``):

* ``random`` (the default, class-wise): each class gets one corner of the box, ``s0, s1`` at +-eps on every
  lattice point and channel, the corners spread over the classes (greedy farthest-point choice, so classes
  differ in as many shifts as the box allows; seeded). No surrogate, seconds to craft. Chosen as the default
  because a class-wise code at the full budget *is* the shortcut (as LSP's class-wise patches are) and a
  low-frequency, intensity-dependent one is what a rate-limited reconstruction keeps: the affine map moves
  with the image's own intensities, so D-VAE's stage-1 class-wise ``p_hat`` (one image per class) cannot
  take it out exactly, and stage 2 reconstructs brightness and contrast, the lowest frequencies there are.
* ``min``: the shifts minimise a surrogate's loss (EM's min-min on the shift parameters,
  :class:`~unpoison.attacks._parametrised.ParametrisedEM`, checkpointed every round), class-wise or per
  image (``scope=sample``; a random shift per image is no shortcut, so ``sample`` needs ``min``).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import UserError
from ..params import Param
from ._parametrised import ParametrisedEM, upsample
from .base import register_attack
from .em import EM

#: candidate corners drawn for the farthest-point choice when the box has more corners than this
_MAX_CANDIDATES = 4096


def spread_codes(k: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` points of ``[-1, 1]^dim`` far apart: corners (``2^dim >= k``) or a lattice of more levels, picked by
    greedy farthest-point choice from a seeded start (ties to a seeded order)."""
    levels = 2
    while levels**dim < k:
        levels += 1
    grid = np.linspace(-1.0, 1.0, levels)
    if levels**dim <= _MAX_CANDIDATES:
        cand = np.array(list(itertools.product(grid, repeat=dim)), dtype=np.float64)
    else:
        cand = rng.choice(grid, size=(_MAX_CANDIDATES, dim))
    cand = cand[rng.permutation(len(cand))]
    chosen = [0]
    dist = ((cand - cand[0]) ** 2).sum(1)
    for _ in range(k - 1):
        i = int(np.argmax(dist))  # first of the farthest (a seeded order)
        chosen.append(i)
        dist = np.minimum(dist, ((cand - cand[i]) ** 2).sum(1))
    return cand[chosen]


@register_attack("colorshift", "colour / intensity shift: per-channel smooth gain and offset per class (l_inf 8/255)")
class ColorShift(ParametrisedEM):
    norm = "linf"
    norms = ("linf",)
    default_eps: ClassVar[dict[str, float]] = {"linf": 8 / 255}
    SMOKE: ClassVar[dict[str, Any]] = {**EM.SMOKE, "search": "min"}
    PARAMS: ClassVar[dict[str, Param]] = {
        **EM.PARAMS,
        "scope": Param(str, "class", "one shift per class, or per image (sample: needs search=min)",
                       choices=("class", "sample")),
        "grid": Param(int, 2, "lattice of the gain and offset (grid x grid points, bilinearly upsampled; 1: one "
                              "per channel)", low=1, high=64),
        "search": Param(str, "random", "random: spread class-wise corners at the full budget (no surrogate); "
                                       "min: minimise a surrogate's loss (EM's min-min)", choices=("random", "min")),
    }
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"paper": {}, "cpu": dict(EM.PRESETS["cpu"])}

    def check_params(self) -> None:
        super().check_params()
        if self.params["scope"] == "sample" and self.params["search"] == "random":
            raise UserError("colorshift scope=sample needs search=min: a random shift per image is no shortcut")

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self.y[idx] if self.params["scope"] == "class" else idx

    def lattice(self) -> tuple[int, int]:
        _, _, h, w = self.x.shape
        g = self.params["grid"]
        return min(g, h), min(g, w)

    def init_theta(self) -> torch.Tensor:
        """``M x C x 2 x gh x gw`` shifts (M classes or images; s0 then s1): spread corners for the class-wise
        code, uniform in the box per image."""
        c = self.x.shape[1]
        gh, gw = self.lattice()
        if self.params["scope"] == "class":
            rng = np.random.default_rng([self.seed, 0xC0105])
            codes = spread_codes(self.num_classes, c * 2 * gh * gw, rng)
            theta = torch.from_numpy(codes).float().view(self.num_classes, c, 2, gh, gw)
        else:
            theta = torch.rand((len(self.x), c, 2, gh, gw), generator=self.cpu_gen) * 2 - 1
        return (theta * self.eps_).to(self.device_)

    def expand(self, theta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        t = theta[self.rows(idx)]
        b, c = t.shape[:2]
        s = upsample(t.reshape(b, c * 2, *t.shape[-2:]), tuple(self.x.shape[-2:])).view(b, c, 2, *self.x.shape[-2:])
        xb = self.x[idx]
        return (1 - xb) * s[:, :, 0] + xb * s[:, :, 1]

    def _craft(self, x: np.ndarray, y: np.ndarray, num_classes: int) -> torch.Tensor:
        if self.params["search"] == "min":
            out = super()._craft(x, y, num_classes)
        else:
            self.setup(x, y, num_classes)
            self._theta = self.init_theta()
            out = self.expand_all(self._theta)
            self.info_ = {}
        self.info_.update(self.describe())
        return out

    def after_rounds(self, theta: torch.Tensor) -> None:
        self._theta = theta

    def describe(self) -> dict[str, Any]:
        """The class-wise shifts in grey levels (s0, s1 per channel and lattice point), for the manifest."""
        out: dict[str, Any] = {"lattice": list(self.lattice())}
        if self.params["scope"] == "class":
            lv = (self._theta * 255).round(decimals=2).cpu()
            out["shifts_levels"] = {str(k): {"s0": lv[k, :, 0].tolist(), "s1": lv[k, :, 1].tolist()}
                                    for k in range(len(lv))}
            d = torch.cdist(self._theta.flatten(1), self._theta.flatten(1)) * 255
            d.fill_diagonal_(math.inf)
            out["min_code_distance_levels"] = round(float(d.min()), 2) if len(d) > 1 else None
        return out
