"""OPS, one-pixel shortcut (Wu et al., ICLR 2023): an l0 = 1 poison found by search, no surrogate.

For each class, over every pixel position p and every colour v among the 2^C corners of [0, 1]^C,
score ``mean(|v - x_p|) / std(|v - x_p|)`` over the class's images (``|v - x_p|`` averaged over
channels): a large, consistent change. The best (p, v) is written into every image of the class. The
search is one vectorised pass per class and corner. ``eps`` > 1 picks the best ``eps`` positions.
An image whose pixel already had colour v is left unchanged (its l0 is 0).

Classes never share a position: a pixel that two classes both carry says nothing about the class.
On data with a constant background (Fashion-MNIST's black border) many positions tie at the top
score for every class, and the first-index rule of a plain argmax gives nine of ten classes the
same white pixel at (0, 0). Ties (scores within ``tie_tol`` of the best free one) are broken by
taking the position farthest from those already chosen (then by a seeded draw), so the classes'
pixels are spread out and stay apart under the victim's random crops.
"""

from __future__ import annotations

import itertools
from typing import ClassVar

import numpy as np

from ..params import Param
from .base import Attack, register_attack


def ops_scores(xc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position (H x W): the best corner colour (uint8 0/255, H x W x C) and its score, for one class."""
    x = xc.astype(np.float32) / 255.0
    c = x.shape[-1]
    corners = np.array(list(itertools.product((0.0, 1.0), repeat=c)), dtype=np.float32)  # 2^C x C
    scores = np.empty((len(corners), *x.shape[1:3]), dtype=np.float64)
    for i, v in enumerate(corners):
        dist = np.abs(v - x).mean(-1)  # n x H x W
        scores[i] = dist.mean(0) / (dist.std(0) + 1e-6)
    best = scores.argmax(0)
    return (corners[best] * 255).astype(np.uint8), scores.max(0)


def pick_positions(score: np.ndarray, k: int, taken: list[tuple[int, int]], rng: np.random.Generator,
                   tie_tol: float = 1e-6) -> list[tuple[int, int]]:
    """The ``k`` best free positions of an H x W score map; near-ties go to the one farthest from ``taken``."""
    score = score.astype(np.float64).copy()
    out: list[tuple[int, int]] = []
    rows, cols = np.indices(score.shape)
    for r, c in taken:
        score[r, c] = -np.inf
    for _ in range(k):
        top = score.max()
        if not np.isfinite(top):
            raise ValueError("no free pixel position left for OPS")
        cand = np.flatnonzero(score.ravel() >= top - tie_tol * max(1.0, abs(top)))
        if len(cand) > 1 and (taken or out):
            pts = np.array(taken + out)
            d = np.min((rows.ravel()[cand, None] - pts[None, :, 0]) ** 2
                       + (cols.ravel()[cand, None] - pts[None, :, 1]) ** 2, axis=1)
            cand = cand[d == d.max()]
        flat = int(cand[rng.integers(len(cand))]) if len(cand) > 1 else int(cand[0])
        pos = (flat // score.shape[1], flat % score.shape[1])
        out.append(pos)
        score[pos] = -np.inf
    return out


@register_attack("ops", "one-pixel shortcut: per class the pixel and corner colour that change most consistently")
class OPS(Attack):
    norm = "l0"
    norms = ("l0",)
    default_eps: ClassVar[dict[str, float]] = {"l0": 1}
    PARAMS: ClassVar[dict[str, Param]] = {
        "tie_tol": Param(float, 1e-6, "relative score difference still counted as a tie", low=0),
    }

    def _craft(self, x: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
        k = int(self.eps_)
        out = x.copy()
        rng = np.random.default_rng([self.seed, 0x0B5])
        taken: list[tuple[int, int]] = []
        found = {}
        for cls in np.unique(y):
            sel = np.flatnonzero(y == cls)
            colour, score = ops_scores(x[sel])
            pos = pick_positions(score, k, taken, rng, self.params["tie_tol"])
            taken += pos
            for r, c in pos:
                out[sel, r, c, :] = colour[r, c]
            found[int(cls)] = {"positions": [list(p) for p in pos], "colours": [colour[p].tolist() for p in pos],
                               "score": [float(score[p]) for p in pos]}
        self.info_ = {"pixels": found}
        return out
