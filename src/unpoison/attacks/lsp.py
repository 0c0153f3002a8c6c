"""LSP, linearly separable synthetic perturbations (Yu et al., "Availability attacks create shortcuts").

No surrogate: each class k gets a Gaussian cluster centre mu_k in a low-dimensional space (one value per patch
and channel: 4 x 4 patches of 8 px on 32 px images, 32 px patches on 224 px); every image's noise is ``mu_k +
sigma * N(0, I)`` (well-separated clusters: sigma << |mu_k - mu_j|), upsampled to full size by repeating each
value over its patch, and scaled to the l2 bound (docs/design.md, "Threat model and bounds": l2 1.0 at CIFAR
size, sqrt(d/3072)-scaled elsewhere) *after* clipping to [0, 1] (``fit_after_clip``; the original scales first
and loses the clipped part). The noise alone is linearly separable by class, which is the shortcut the
classifier learns.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ..params import Param
from .base import Attack, fit_l2_after_clip, project, register_attack


def default_patch(size: int) -> int:
    """8 px on 32 px (4 x 4 patches), 7 on 28, 32 px on 224 (7 x 7 patches)."""
    return max(1, size // 4) if size < 64 else 32


@register_attack("lsp", "linearly separable synthetic noise, class-wise Gaussian clusters per patch (l2)")
class LSP(Attack):
    norm = "l2"
    norms = ("l2", "linf")
    default_eps: ClassVar[dict[str, float]] = {"l2": 1.0, "linf": 8 / 255}
    PARAMS: ClassVar[dict[str, Param]] = {
        "patch_size": Param(int, 0, "patch side in pixels (0: 8 px on 32 px images, image/4 below 64 px, 32 above)",
                            low=0),
        "cluster_std": Param(float, 0.1, "std of each image's noise around its class centre (centres have unit std)",
                             low=0),
        "fit_after_clip": Param(bool, True, "scale so the l2 bound holds after clipping to [0, 1] (the whole budget)"),
    }

    def _craft(self, x: np.ndarray, y: np.ndarray, num_classes: int) -> torch.Tensor:
        n, h, w, c = x.shape
        patch = self.params["patch_size"] or default_patch(max(h, w))
        gh, gw = math.ceil(h / patch), math.ceil(w / patch)
        g = torch.Generator().manual_seed(self.seed)
        centres = torch.randn(num_classes, c, gh, gw, generator=g, dtype=torch.float64)
        yt = torch.as_tensor(y)
        low = centres[yt] + self.params["cluster_std"] * torch.randn(n, c, gh, gw, generator=g, dtype=torch.float64)
        noise = F.interpolate(low, scale_factor=patch, mode="nearest")[:, :, :h, :w]
        if self.norm_used == "l2" and self.params["fit_after_clip"]:
            noise = fit_l2_after_clip(x, noise, self.eps_)
        elif self.norm_used == "l2":
            noise = noise * (self.eps_ / noise.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, 1, 1, 1)
        else:  # l_inf variant: the sign pattern at full strength
            noise = self.eps_ * noise / noise.abs().flatten(1).max(1).values.clamp_min(1e-12).view(-1, 1, 1, 1)
        self.info_ = {"patch_size": patch, "grid": [gh, gw]}
        return project(noise.float(), self.norm_used, self.eps_)
