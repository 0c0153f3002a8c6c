"""Pictures people would rather see than read: image grids (poisoned / purified / residual)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .utils import atomic_path


def residual_image(a: np.ndarray, b: np.ndarray, gain: float | None = None) -> np.ndarray:
    """``a - b`` mapped around mid-grey; amplified so the largest |difference| spans the range."""
    d = a.astype(np.float32) - b.astype(np.float32)
    if gain is None:
        m = float(np.abs(d).max())
        gain = 127.0 / m if m > 0 else 1.0
    return np.clip(127.5 + gain * d, 0, 255).astype(np.uint8)


def save_image_grid(rows: dict[str, np.ndarray], path: str | Path, n: int = 8, scale: int | None = None,
                    title: str | None = None) -> Path:
    """One labelled row per entry of ``rows`` (uint8 NHWC), ``n`` images each, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    n = min(n, *(len(v) for v in rows.values()))
    h, w = next(iter(rows.values())).shape[1:3]
    fig, axes = plt.subplots(len(names), n, figsize=(n * 1.1, len(names) * 1.2 + (0.4 if title else 0)),
                             squeeze=False)
    for r, name in enumerate(names):
        for c in range(n):
            ax = axes[r][c]
            img = rows[name][c]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      vmin=0, vmax=255, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
