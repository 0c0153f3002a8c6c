"""Measuring a purification against the clean images: the one place the CLI (``--reference``), the
benchmark cells and the demo get their per-stage numbers and the residual grid from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..disentangle import poisoned_indices, purification_report, save_residual_grid, true_perturbation


def measure_against_clean(x_clean: np.ndarray, x_poisoned: np.ndarray, x_out: np.ndarray,
                          stages: dict[str, np.ndarray], p_hat: np.ndarray | None, y: np.ndarray,
                          subset: np.ndarray | None = None, grid: str | Path | None = None,
                          title: str = "") -> dict[str, Any]:
    """Every stage against the clean images (:func:`unpoison.disentangle.purification_report`: stage 1's
    corr(p_hat, p), poison energy removed, the poison left and the PSNR to the clean images after each stage,
    on the poisoned images alone under partial poisoning), and with ``grid`` the residual image
    (p, p_hat, p - p_hat, output - clean) of up to 8 poisoned images. ``subset``: the poisoned indices when
    known (else: the images that differ from the clean ones)."""
    rep = purification_report(x_clean, x_poisoned, x_out, stages, p_hat, y, subset=subset)
    if grid is not None:
        if subset is not None:
            show = np.sort(np.asarray(subset))[:8]
        else:
            partial = rep["poisoned"]["partial"]  # show poisoned images: an unpoisoned one has p = 0
            show = (poisoned_indices(x_clean, x_poisoned) if partial else np.arange(len(x_poisoned)))[:8]
            title += " (poisoned images)" if partial else ""
        if len(show):
            save_residual_grid(true_perturbation(x_clean[show], x_poisoned[show]),
                               None if p_hat is None else np.asarray(p_hat)[show], grid, x0=x_poisoned[show],
                               left={"output - clean": x_out[show].astype(np.float32) - x_clean[show]},
                               title=title)
    return rep
