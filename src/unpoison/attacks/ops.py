"""OPS, one-pixel shortcut (Wu et al., ICLR 2023): an l0 = 1 poison found by search, no surrogate.

For each class, over every pixel position p and every colour v among the 2^C corners of [0, 1]^C,
score ``mean(|v - x_p|) / std(|v - x_p|)`` over the class's images (``|v - x_p|`` averaged over
channels): a large, consistent change. The best (p, v) is written into every image of the class. The
search is one vectorised pass per class and corner. ``eps`` > 1 picks the best ``eps`` positions.
An image whose pixel already had colour v is left unchanged (its l0 is 0).
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

import numpy as np

from .base import Attack, register_attack


def ops_search(xc: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best ``k`` (row, col) positions and corner colours (uint8 0/255) for one class's images n x H x W x C."""
    x = xc.astype(np.float32) / 255.0
    c = x.shape[-1]
    corners = np.array(list(itertools.product((0.0, 1.0), repeat=c)), dtype=np.float32)  # 2^C x C
    scores = np.empty((len(corners), *x.shape[1:3]), dtype=np.float64)
    for i, v in enumerate(corners):
        dist = np.abs(v - x).mean(-1)  # n x H x W
        scores[i] = dist.mean(0) / (dist.std(0) + 1e-6)
    best_corner = scores.argmax(0)  # H x W
    best_score = scores.max(0)
    flat = np.argsort(-best_score.ravel(), kind="stable")[:k]
    rows, cols = np.unravel_index(flat, best_score.shape)
    colours = (corners[best_corner[rows, cols]] * 255).astype(np.uint8)
    return np.stack([rows, cols], 1), colours, best_score[rows, cols]


@register_attack("ops", "one-pixel shortcut: per class the pixel and corner colour that change most consistently")
class OPS(Attack):
    norm = "l0"
    norms = ("l0",)
    default_eps: ClassVar[dict[str, float]] = {"l0": 1}
    PARAMS: ClassVar[dict[str, tuple[type, Any, str]]] = {}

    def _craft(self, x: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
        k = int(self.eps)
        out = x.copy()
        found = {}
        for cls in np.unique(y):
            sel = np.flatnonzero(y == cls)
            pos, col, score = ops_search(x[sel], k)
            for (r, c), v in zip(pos, col):
                out[sel, r, c, :] = v
            found[int(cls)] = {"positions": pos.tolist(), "colours": col.tolist(), "score": score.tolist()}
        self.info_ = {"pixels": found}
        return out
