"""AR, autoregressive perturbations (Sandoval-Segura et al., NeurIPS 2022).

No surrogate: class k gets a random 3x3 autoregressive filter per channel (eight causal coefficients, the
bottom-right one fixed at 0, normalised to sum to 1, as in the authors' generator). Each image's noise starts
as Gaussian values and every pixel is then replaced, in raster order, by the filter's prediction from its
already-updated neighbours above and to the left. A margin of ``crop`` rows and columns is generated and
dropped (start-up artefacts), and the noise is scaled to the l2 bound (docs/design.md, "Threat model and
bounds": 1.0 at CIFAR size, sqrt(d/3072)-scaled elsewhere). The recursion runs vectorised over images (one
step per pixel). Filters whose recursion blows up (non-finite) are re-drawn. The matching filter (coefficients
with -1 at the bottom-right) responds ~0 to its own class's noise, which is the shortcut.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch

from ..params import Param
from .base import Attack, fit_l2_after_clip, project, register_attack


def ar_coefficients(num_classes: int, channels: int, gen: torch.Generator) -> torch.Tensor:
    """K x C x 3 x 3 float64 filters, bottom-right 0, each channel's entries summing to 1."""
    b = torch.randn(num_classes, channels, 3, 3, generator=gen, dtype=torch.float64)
    b[..., 2, 2] = 0
    s = b.sum((2, 3), keepdim=True)
    s = torch.where(s.abs() < 0.1, torch.full_like(s, 0.1) * torch.sign(s + 1e-12), s)
    return b / s


def ar_generate(coef: torch.Tensor, size: tuple[int, int], gen: torch.Generator, crop: int) -> torch.Tensor:
    """Run the AR recursion for per-image filters ``coef`` (n x C x 3 x 3) -> n x C x H x W (float64)."""
    n, c = coef.shape[:2]
    h, w = size[0] + crop, size[1] + crop
    s = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64)
    taps = [(di, dj) for di in range(3) for dj in range(3) if (di, dj) != (2, 2)]
    cw = [coef[:, :, di, dj] for di, dj in taps]
    for i in range(h - 2):
        for j in range(w - 2):
            val = torch.zeros(n, c, dtype=torch.float64)
            for (di, dj), k in zip(taps, cw):
                val += k * s[:, :, i + di, j + dj]
            s[:, :, i + 2, j + 2] = val
    return s[:, :, crop:, crop:]


def _peakiness(noise: torch.Tensor) -> torch.Tensor:
    f = noise.flatten(1)
    r = f.abs().max(1).values / f.pow(2).mean(1).sqrt().clamp_min(1e-300)
    return torch.where(torch.isfinite(r), r, torch.full_like(r, float("inf")))


def high_freq_fraction(noise: torch.Tensor) -> torch.Tensor:
    """Share of each image's energy a 3x3 box blur removes (0: smooth ramp, ~1: pixel-scale texture)."""
    f = noise.flatten(0, 1).unsqueeze(1)
    low = torch.nn.functional.avg_pool2d(f, 3, stride=1, padding=1, count_include_pad=False)
    r = ((f - low).flatten(1).pow(2).sum(1) / f.flatten(1).pow(2).sum(1).clamp_min(1e-300)).view(noise.shape[:2])
    r = r.mean(1)
    return torch.where(torch.isfinite(r), r, torch.zeros_like(r))


def stable_coefficients(num_classes: int, channels: int, size: tuple[int, int], crop: int, max_peak: float,
                        gen: torch.Generator, probes: int = 8, tries: int = 200, min_hf: float = 0.0) -> torch.Tensor:
    """Draw filters until each class's recursion stays spread out (median peak/rms < ``max_peak``) and
    textured (median high-frequency share >= ``min_hf``).

    Half of the random filters diverge, piling the whole l2 budget onto the last few pixels, and many
    of the rest drift into smooth ramps that every class's filter predicts equally well (the matching
    filter sums to zero, so it cancels any ramp): neither is a class-specific shortcut. The authors
    released pre-selected filters; this selects them at generation time instead.
    """
    out = torch.empty(num_classes, channels, 3, 3, dtype=torch.float64)
    best = torch.full((num_classes,), float("inf"), dtype=torch.float64)
    todo = torch.arange(num_classes)
    for _ in range(tries):
        cand = ar_coefficients(len(todo), channels, gen)
        probe = ar_generate(cand.repeat_interleave(probes, 0), size, gen, crop)
        peak = _peakiness(probe).view(len(todo), probes).median(1).values
        hf = high_freq_fraction(probe).view(len(todo), probes).median(1).values
        # one badness score: < 1 means both criteria hold
        bad = torch.maximum(peak / max_peak, min_hf / hf.clamp_min(1e-12)) if min_hf > 0 else peak / max_peak
        better = bad < best[todo]
        out[todo[better]] = cand[better]
        best[todo[better]] = bad[better]
        todo = todo[best[todo] >= 1.0]
        if len(todo) == 0:
            break
    return out


@register_attack("ar", "autoregressive noise: one random 3x3 AR filter per class, scaled to l2")
class AR(Attack):
    norm = "l2"
    norms = ("l2", "linf")
    default_eps: ClassVar[dict[str, float]] = {"l2": 1.0, "linf": 8 / 255}
    SMOKE: ClassVar[dict[str, Any]] = {"crop": 2}
    PARAMS: ClassVar[dict[str, Param]] = {
        "crop": Param(int, 4, "rows/columns generated before the image and dropped (start-up margin)", low=0),
        "max_peak": Param(float, 5.0, "keep only filters whose noise has peak/rms below this (stable recursions)",
                          low=0),
        "min_hf": Param(float, 0.5, "keep only filters whose noise has at least this share of energy above a 3x3 blur",
                        low=0),
        "fit_after_clip": Param(bool, True, "scale so the l2 bound holds after clipping to [0, 1] (the whole budget)"),
    }

    def _craft(self, x: np.ndarray, y: np.ndarray, num_classes: int) -> torch.Tensor:
        n, h, w, c = x.shape
        g = torch.Generator().manual_seed(self.seed)
        coef = stable_coefficients(num_classes, c, (h, w), self.params["crop"], self.params["max_peak"], g,
                                   min_hf=self.params["min_hf"])
        noise = ar_generate(coef[torch.as_tensor(y)], (h, w), g, self.params["crop"])
        # scale per image in float64 before anything can overflow float32
        noise = noise / noise.abs().flatten(1).max(1).values.clamp_min(1e-300).view(-1, 1, 1, 1)
        if self.norm_used == "l2" and self.params["fit_after_clip"]:
            noise = fit_l2_after_clip(x, noise, self.eps_)
        elif self.norm_used == "l2":
            noise = noise * (self.eps_ / noise.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, 1, 1, 1)
        else:
            noise = noise * self.eps_
        self.info_ = {"crop": self.params["crop"], "ar_coefficients": coef.tolist()}
        return project(noise.float(), self.norm_used, self.eps_)
