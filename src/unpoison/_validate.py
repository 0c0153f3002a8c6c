"""Checks at the API boundary, shared by attacks and defenses (scikit-learn style: clear messages, no casts)."""

from __future__ import annotations

import numpy as np
import torch

from .errors import UserError


def as_uint8_nhwc(x: np.ndarray | torch.Tensor, name: str = "x") -> np.ndarray:
    """A non-empty uint8 ``N x H x W x C`` batch (C in 1, 3) as numpy; tensors are moved to the CPU."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise UserError(f"{name} must be uint8 images in 0..255, got dtype {x.dtype}")
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise UserError(f"{name} must be N x H x W x C with C in (1, 3), got shape {x.shape}")
    if len(x) == 0:
        raise UserError(f"{name} is empty")
    return x


def as_labels(y: np.ndarray | torch.Tensor | None, n: int, name: str = "y") -> np.ndarray | None:
    """``n`` non-negative integer labels as int64 numpy, or None when ``y`` is None."""
    if y is None:
        return None
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{name} must be {n} integer labels, got {y.dtype} {y.shape}")
    if n and y.min() < 0:
        raise UserError(f"{name} must be >= 0, got {y.min()}")
    return y.astype(np.int64)
