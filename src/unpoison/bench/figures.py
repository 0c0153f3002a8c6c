"""The report's figures (matplotlib, imported when a figure is drawn): PSNR against accuracy, per-attack bars,
accuracy against purification CPU time (the frontier) and Theorem 2's bounds. Every figure is written atomically."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..defenses.dvae.config import DVAE_PRESETS, DVAEConfig
from ..errors import UserError
from ..outputs import atomic_path
from .table import Table, axis_label
from .tables import purify_cpu_s


def fig_to_png(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _labelled_lines(pts: dict[str, list[tuple[float, float, str]]], path: Path, title: str, xlabel: str,
                    logx: bool = False, figsize: tuple[float, float] = (6, 4), fontsize: int = 6) -> Path:
    """One line per attack through its (x, accuracy) points, each point labelled with its defense."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=figsize)
    for atk, p in pts.items():
        p.sort()
        ax.plot([a for a, _, _ in p], [b for _, b, _ in p], marker="o", lw=0.6 if logx else 1.5, label=atk)
        for a, b, lab in p:
            ax.annotate(lab, (a, b), fontsize=fontsize, alpha=0.7)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("clean test accuracy [%]")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig_to_png(fig, path)


def fig_psnr_acc(cells: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """PSNR(input, purified) vs clean test accuracy, one line per attack (Fig. 2/6, Table 13's sweep)."""
    pts: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for r in cells:
        res = r["results"] or {}
        if r["status"] == "done" and res.get("psnr") is not None and math.isfinite(res["psnr"]):
            pts[axis_label(r["config"], "attack")].append((res["psnr"], res["final_acc"],
                                                           axis_label(r["config"], "defense")))
    return _labelled_lines(pts, path, title, "PSNR(poisoned, purified) [dB]") if pts else None


def fig_bars(table: Table, path: Path, title: str) -> Path | None:
    """Grouped bars: one group per row of an attacks x defenses table, one bar per defense."""
    def num(s: str) -> float:
        try:
            return float(s.split()[0])
        except (ValueError, IndexError):
            return float("nan")

    rows = [r for r in table.rows if r[0] not in ("Mean", "PSNR (dB)")]
    cols = [c for c in table.header[1:] if c != "Mean"]
    if not rows or not cols:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 3.8))
    w = 0.8 / len(cols)
    for j, c in enumerate(cols):
        ax.bar(np.arange(len(rows)) + j * w, [num(r[1 + j]) for r in rows], w, label=c)
    ax.set_xticks(np.arange(len(rows)) + 0.4 - w / 2)
    ax.set_xticklabels([r[0] for r in rows], rotation=30, fontsize=7)
    ax.set_ylabel("clean test accuracy [%]")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=min(4, len(cols)))
    return fig_to_png(fig, path)


#: one marker (and colour) per defense family in the frontier plot; other families get the spare markers in turn
_FAMILY_STYLE = {"dvae": ("o", "tab:blue", "D-VAE"), "vae": ("X", "tab:cyan", "VAE"), "ae": ("h", "tab:olive", "AE"),
                 "bdr": ("s", "tab:orange", "BDR"), "jpeg": ("D", "tab:red", "JPEG"),
                 "gray": ("^", "tab:gray", "grayscale"), "gauss": ("v", "tab:pink", "Gaussian filter"),
                 "median": ("P", "tab:brown", "median filter"), "avatar": ("*", "tab:purple", "AVATAR")}
_SPARE_STYLES = [("p", "tab:green"), ("<", "darkgoldenrod"), (">", "teal"), ("8", "slateblue")]


def dvae_preset_of(d: dict[str, Any]) -> str | None:
    """The D-VAE preset a defense entry builds exactly (its parameters spelled out, or named), if any: the frontier
    plot marks the rows a preset was chosen from."""
    if d.get("name") != "dvae":
        return None
    params = dict(d.get("params") or {})
    try:
        built = DVAEConfig.preset(params.pop("preset", None) or "paper", **params)  # what the cell built
        return next((p for p in DVAE_PRESETS.names() if DVAEConfig.preset(p) == built), None)
    except UserError:
        return None


def _frontier_points(cells: list[dict[str, Any]]) -> tuple[dict[str, list[dict[str, Any]]], dict[str, float]]:
    """Per attack, one point per purifying defense (mean CPU minutes over its timed cells, accuracy mean and std
    over its seeds), and per attack the accuracy without a defense (w/o)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in cells:
        if r["status"] == "done" and (r["results"] or {}).get("final_acc") is not None:
            groups[(axis_label(r["config"], "attack"), axis_label(r["config"], "defense"))].append(r)
    pts: dict[str, list[dict[str, Any]]] = defaultdict(list)
    base: dict[str, float] = {}
    for (atk, d), g in groups.items():
        acc = [float(r["results"]["final_acc"]) for r in g]
        dcfg = g[0]["config"]["defense"]
        if dcfg["name"] == "none":
            base[atk] = float(np.mean(acc))
            continue
        cpu = [c for c in (purify_cpu_s(r) for r in g) if c is not None]
        if cpu:
            pts[atk].append({"label": d, "family": dcfg["name"], "preset": dvae_preset_of(dcfg),
                             "x": max(float(np.mean(cpu)) / 60, 1e-3), "y": float(np.mean(acc)),
                             "std": float(np.std(acc)) if len(acc) > 1 else 0.0})
    return pts, base


def pareto_front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other point beats on both axes (cheaper or as cheap, and at least as accurate), by CPU time."""
    front: list[dict[str, Any]] = []
    for p in sorted(points, key=lambda q: (q["x"], -q["y"])):
        if not front or p["y"] > front[-1]["y"]:
            front.append(p)
    return front


def _place_labels(fig: Any, ax: Any, items: list[tuple[str, float, float]], points: list[tuple[float, float]],
                  fontsize: float) -> None:
    """Write each ``(text, x, y)`` next to its point (a thin leader line to it) at the first of a few offsets where
    it covers no marker of ``points`` and no label placed before and stays inside the axes (greedy; few points)."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    r = 4.0 * fig.dpi / 72  # a marker's half size in pixels
    taken = [Bbox.from_extents(u - r, v - r, u + r, v + r) for u, v in ax.transData.transform(points)]
    offsets = [(5, 4), (5, -11), (-14, 4), (-14, -11), (5, 13), (-14, 13), (5, -20), (-14, -20), (14, -4),
               (-24, -4), (5, 22), (5, -29), (14, 22), (14, -29)]
    for text, x, y in items:
        for k, (dx, dy) in enumerate(offsets):
            a = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                            fontweight="bold", color="black",
                            arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.35", "shrinkA": 0, "shrinkB": 3})
            a.update_positions(renderer)
            box = Text.get_window_extent(a, renderer).expanded(1.15, 1.2)  # the text alone, not its leader
            fits = inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1)
            if (fits and not any(box.overlaps(b) for b in taken)) or k == len(offsets) - 1:
                taken.append(box)
                break
            a.remove()


def fig_frontier(cells: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Accuracy after purification against the purification's CPU time, one panel per attack: one marker per
    defense family, each point a defense (mean over its seeds, the bar its std), the Pareto front as a step line,
    the accuracy without a defense as a dashed line. The front's points and the rows that are a D-VAE preset carry
    a number (numbered in the table's order); the panel after the last attack is the key."""
    pts, base = _frontier_points(cells)
    if not pts:
        return None
    plt = pyplot()
    from matplotlib.ticker import NullFormatter

    atks = [a for a in dict.fromkeys(axis_label(r["config"], "attack") for r in cells) if a in pts or a in base]
    ncols = min(3, len(atks) + 1)
    nrows = -(-(len(atks) + 1) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 3.5 * nrows), squeeze=False)
    flat = list(axes.flat)
    styles: dict[str, tuple[str, str, str]] = {}
    for p in (q for a in atks for q in pts.get(a, [])):
        if p["family"] not in styles:
            spare = _SPARE_STYLES[len([f for f in styles if f not in _FAMILY_STYLE]) % len(_SPARE_STYLES)]
            styles[p["family"]] = _FAMILY_STYLE.get(p["family"], (*spare, p["family"]))
    xs = [p["x"] for a in atks for p in pts.get(a, [])]
    lo, hi = min(xs) / 2.5, max(xs) * 2.5
    widen = max(1.0, math.sqrt(100 * lo / hi))  # at least two decades, so the axis has two labelled ticks
    xlim = (lo / widen, hi * widen)
    marked: dict[str, list[dict[str, Any]]] = {}
    for ax, atk in zip(flat, atks):
        ps = pts.get(atk, [])
        for p in ps:
            marker, color, _ = styles[p["family"]]
            ax.errorbar(p["x"], p["y"], yerr=p["std"] or None, fmt=marker, color=color, ms=6, mec="black", mew=0.4,
                        elinewidth=0.8, capsize=2, alpha=0.85, zorder=3)
        front = pareto_front(ps)
        if front:
            ax.step([p["x"] for p in front] + [xlim[1]], [p["y"] for p in front] + [front[-1]["y"]], where="post",
                    color="black", lw=1.0, alpha=0.6, zorder=2)
        if atk in base:
            ax.axhline(base[atk], color="dimgray", ls="--", lw=1.0, zorder=1)
        ax.set_xscale("log")
        ax.set_xlim(*xlim)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ys = [p["y"] - p["std"] for p in ps] + [p["y"] + p["std"] for p in ps] + ([base[atk]] if atk in base else [])
        pad = max(2.0, 0.08 * (max(ys) - min(ys)))
        ax.set_ylim(min(ys) - pad, max(ys) + pad)
        ax.set_title(atk, fontsize=10)
        ax.grid(alpha=0.3, which="both", lw=0.5)
        ax.tick_params(labelsize=8)
        ax.set_xlabel("purification CPU time [min]", fontsize=8)
        ax.set_ylabel("clean test accuracy [%]", fontsize=8)
        marked[atk] = sorted(({id(p): p for p in front} | {id(p): p for p in ps if p["preset"]}).values(),
                             key=lambda p: p["x"])
    on_key = {p["label"] for ms in marked.values() for p in ms}
    numbers: dict[str, int] = {}
    for p in (q for a in atks for q in pts.get(a, []) if q["label"] in on_key):
        numbers.setdefault(p["label"], len(numbers) + 1)
    for ax in flat[len(atks):]:
        ax.axis("off")
    fig.suptitle(f"{title} (fit + transform; mean over seeds, bar: std)", fontsize=10)
    fig.tight_layout()
    fig.canvas.draw()
    for ax, atk in zip(flat, atks):
        _place_labels(fig, ax, [(str(numbers[p["label"]]), p["x"], p["y"]) for p in marked[atk]],
                      [(p["x"], p["y"]) for p in pts.get(atk, [])], 7)
    key_ax = flat[len(atks)]
    handles = [plt.Line2D([], [], ls="", marker=m, color=c, mec="black", mew=0.4, label=name)
               for m, c, name in styles.values()]
    handles += [plt.Line2D([], [], color="black", alpha=0.6, label="Pareto front"),
                plt.Line2D([], [], color="dimgray", ls="--", label="w/o (no defense)")]
    key_ax.legend(handles=handles, loc="upper left", fontsize=7, frameon=False, ncol=2)
    presets = {p["label"]: p["preset"] for a in atks for p in pts.get(a, []) if p["preset"]}
    lines = [f"{n:>2}  {lab}" + (f"  (= preset {presets[lab]})" if lab in presets else "")
             for lab, n in numbers.items()]
    key_ax.text(0.0, 0.62, "numbered: on a Pareto front or a D-VAE preset\n" + "\n".join(lines),
                transform=key_ax.transAxes, fontsize=7, va="top", family="monospace")
    return fig_to_png(fig, path)


def fig_theorem2(res: dict[str, Any], path: Path) -> Path:
    plt = pyplot()
    rows = sorted(res["rows"], key=lambda r: r["r"])
    r = [x["r"] for x in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(r, [x["kld"] for x in rows], "o-", label="KLD (numerical)")
    ax.plot(r, [x["upper"] for x in rows], "--", label="upper: ½ln(1+r²)")
    ax.plot(r, [x["lower"] for x in rows], ":", label="lower: ½ln(1+r²) − ln2")
    ax.set_xscale("log")
    ax.set_xlabel("r = δ/σ")
    ax.set_ylabel("KLD(p_z ‖ N(0,1)) [nats]")
    ax.set_title("Theorem 2: KLD of a normalised two-Gaussian mixture", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig_to_png(fig, path)
