"""Pictures people would rather see than read: image grids (poisoned / purified / residual)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .outputs import atomic_path


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


def save_scan_evidence(res: object, truth: np.ndarray | None, path: str | Path, title: str = "") -> Path:
    """The scan's evidence as a PNG: each signal's strongest test in units of its threshold (>= 1: fired), and
    the per-sample scores (split by ``truth`` when the poisoned indices are known, flagged ones marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = res.evidence  # type: ignore[attr-defined]
    thr = res.info["threshold"]  # type: ignore[attr-defined]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    names = [s for s in ev if "z" in ev[s]]
    zs = [ev[s]["z"] for s in names]
    a.bar(names, zs, color=["tab:red" if abs(z) >= thr else "tab:gray" for z in zs])
    for t in (thr, -thr):
        a.axhline(t, color="k", ls="--", lw=0.8)
    a.set_ylabel("test / its threshold")
    a.set_yscale("symlog", linthresh=max(thr, 1.0))
    verdict = "POISONED" if res.poisoned else "clean"  # type: ignore[attr-defined]
    a.set_title(f"{verdict}, score {res.score:.1f}", fontsize=10)  # type: ignore[attr-defined]
    s = res.sample_scores  # type: ignore[attr-defined]
    lo, hi = np.percentile(s, [0.5, 99.5]) if len(s) else (0.0, 1.0)
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 50)
    if truth is not None and truth.any() and not truth.all():
        b.hist(s[~truth], bins=bins, alpha=0.6, label="clean", color="tab:blue")
        b.hist(s[truth], bins=bins, alpha=0.6, label="poisoned", color="tab:red")
    else:
        b.hist(s, bins=bins, alpha=0.7, color="tab:red" if truth is not None and truth.all() else "tab:blue",
               label="all poisoned" if truth is not None and truth.all() else "all")
    flags = res.flags  # type: ignore[attr-defined]
    if flags.any() and not flags.all():
        b.axvline(float(s[flags].min()), color="k", ls=":", lw=1, label="flagged from")
    b.set_xlabel("per-sample score")
    b.legend(fontsize=8)
    b.set_title(f"{int(flags.sum())} of {len(flags)} flagged", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
