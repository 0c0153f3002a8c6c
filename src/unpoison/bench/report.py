"""Turn a results store into the paper's tables and figures: Markdown, CSV, PNG and one HTML page.

Writes ``OUTDIR/report/``: ``report.md``, ``index.html`` (self-contained: images inlined as base64),
``tables/*.csv`` and ``figures/*.png``. Tables follow the paper's shapes (Table 2: attacks x
defenses; Table 5: larger bounds; Table 6: ablation variants x attacks with a mean; Table 13: JPEG
qualities with a PSNR row; Table 1/7/8 and Sec. 5.2 for the other experiment kinds). When the
dataset is CIFAR-10 the paper's numbers are printed beside ours as ``ours (paper)``. Cells that measured
their stages against the clean images (every purifying cell) add two tables: stage 1's ``p_hat`` against
the true perturbation (corr with quartiles, energy removed) and, per stage, the poison left and the PSNR
to the clean images; their ``residual.png`` grids (p, p_hat, p - p_hat) join the image grids.
``table: {layout: ablation}`` (Tables 5-6 shape) shows accuracy with stage 1's corr and energy removed in
each cell, the means over the attacks, the best defense per attack, and where each defense wins.
Accuracies are the mean over seeds (``± std`` when there are several). ``table: {layout: frontier}`` adds
each defense's purification CPU time and a plot of accuracy against it. ``table: {layout: efficacy}``
lays a purify grid out per attack (bound, PSNR, surrogate accuracy, test accuracy, drop vs clean,
accuracy without crop/flip, craft time).

Names in a config or a dataset spec are user input: Markdown cells escape markup, CSV cells that would
start a spreadsheet formula (``= + - @``) are quoted, and file names are built from a sanitised stem plus a
hash of the spec, never from a raw path.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import math
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..outputs import atomic_path
from ..utils import parse_fraction, write_text_atomic
from .store import Store

# --- the paper's CIFAR-10 numbers (ResNet-18, last-epoch clean test accuracy, %) --------------------------
_T2_COLS = ["w/o", "AT", "AA", "BDR", "Gray", "JPEG-10", "AVA.", "Ours"]
_T2 = {
    "clean": [94.57, 85.17, 92.27, 88.95, 92.74, 85.47, 89.61, 93.29],
    "ntga": [11.10, 83.63, 77.92, 57.80, 65.26, 78.97, 80.72, 89.21],
    "em": [12.26, 84.43, 67.11, 81.91, 19.50, 85.61, 89.54, 91.42],
    "tap": [25.44, 83.89, 55.84, 80.18, 21.50, 84.99, 89.13, 90.48],
    "rem": [22.43, 86.01, 64.99, 32.36, 62.35, 84.40, 86.06, 86.38],
    "sep": [6.63, 83.48, 61.07, 81.21, 8.47, 84.97, 89.56, 90.74],
    "lsp": [13.14, 84.56, 80.39, 40.25, 73.63, 79.91, 81.15, 91.20],
    "ar": [12.50, 82.01, 49.14, 29.14, 36.18, 84.97, 89.64, 91.77],
    "ops": [22.03, 9.48, 64.02, 19.58, 19.43, 77.33, 71.62, 88.95],
}
#: Table 13: JPEG qualities 30/50/70 (10 is Table 2's JPEG column)
_T13 = {"ntga": [66.83, 64.28, 60.19], "em": [70.48, 54.22, 42.23], "tap": [84.82, 77.98, 57.45],
        "rem": [77.73, 71.19, 63.39], "sep": [87.57, 82.25, 59.09], "lsp": [42.11, 33.99, 29.19],
        "ar": [89.17, 86.11, 80.01], "ops": [79.01, 68.68, 59.81]}
#: Table 5: larger bounds (l_inf 16/255, l2 2.0). The paper's ISS column has no defense here (ISS is
#: JPEG/grayscale compression, which Table 2's columns cover), so it is not carried.
_T5_COLS = ["w/o", "AT", "AA", "AVA.", "Ours"]
_T5 = {"em": [10.09, 84.02, 49.23, 85.61, 91.06], "tap": [18.45, 83.46, 52.92, 89.43, 90.55],
       "rem": [23.22, 35.41, 50.92, 52.26, 79.18], "sep": [12.05, 83.98, 56.71, 88.96, 90.93],
       "lsp": [15.45, 79.10, 59.10, 41.70, 86.43]}
#: Table 6: ablation variants, named by :func:`dvae_variant` from D-VAE's real parameters
_T6 = {"no_stage1": {"ntga": 78.62, "em": 91.85, "tap": 90.97, "rem": 82.06, "sep": 90.76, "lsp": 66.76,
                     "ar": 91.39, "ops": 51.71},
       "no_subtract_stage2": {"ntga": 87.44, "em": 91.18, "tap": 90.70, "rem": 85.21, "sep": 90.79, "lsp": 90.63,
                              "ar": 91.31, "ops": 84.92}}
#: Table 7: detection (acc, recall, precision, F1) per attack and ratio
_T7 = {("em", 0.2): (0.918, 1.0, 0.709, 0.830), ("rem", 0.2): (0.561, 1.0, 0.312, 0.476),
       ("lsp", 0.2): (0.777, 1.0, 0.472, 0.641), ("ops", 0.2): (0.724, 0.993, 0.420, 0.590),
       ("em", 0.4): (0.939, 1.0, 0.869, 0.930), ("rem", 0.4): (0.785, 1.0, 0.651, 0.789),
       ("lsp", 0.4): (0.905, 1.0, 0.807, 0.893), ("ops", 0.4): (0.842, 0.991, 0.719, 0.833),
       ("em", 0.6): (0.961, 1.0, 0.938, 0.968), ("rem", 0.6): (0.909, 0.999, 0.868, 0.930),
       ("lsp", 0.6): (0.941, 0.999, 0.912, 0.954), ("ops", 0.6): (0.910, 0.993, 0.874, 0.930),
       ("em", 0.8): (0.982, 1.0, 0.978, 0.989), ("rem", 0.8): (0.958, 0.998, 0.951, 0.975),
       ("lsp", 0.8): (0.973, 1.0, 0.968, 0.984), ("ops", 0.8): (0.932, 0.997, 0.924, 0.959)}
_DEF_COL = {"none": "w/o", "at": "AT", "ueraser": "AA", "bdr": "BDR", "gray": "Gray", "avatar": "AVA.", "dvae": "Ours"}


def dvae_variant(params: dict[str, Any]) -> str | None:
    """Which Table 6 row a D-VAE's parameters are: ``no_stage1`` (``skip_stage1``), ``no_subtract_stage2``
    (``stage2_subtract: false``), or None (the full method, or both ablations at once)."""
    skip = bool(params.get("skip_stage1", False))
    no_sub = params.get("stage2_subtract", True) is False
    if skip and not no_sub:
        return "no_stage1"
    if no_sub and not skip:
        return "no_subtract_stage2"
    return None


def is_cifar10(spec: str) -> bool:
    s = str(spec).lower().replace("-", "").replace("_", "")
    return "cifar10" in s and "cifar100" not in s


def paper_value(cfg: dict[str, Any]) -> float | None:
    """The paper's CIFAR-10 accuracy for a purify cell's (attack, defense), if the paper has one."""
    if not is_cifar10(cfg.get("dataset", "")) or cfg.get("kind") != "purify" or cfg.get("model") != "resnet18":
        return None
    a, d = cfg["attack"], cfg["defense"]
    atk = "clean" if a["name"] == "none" else a["name"]
    params = d.get("params") or {}
    large = False
    if a.get("eps") is not None:
        eps = parse_fraction(a["eps"])
        if math.isclose(eps, 16 / 255, rel_tol=1e-3) or math.isclose(eps, 2.0):
            large = True
        elif not (math.isclose(eps, 8 / 255, rel_tol=1e-3) or math.isclose(eps, 1.0)):
            return None
    variant = dvae_variant(params) if d["name"] == "dvae" else None
    if variant is not None:
        return None if large else _T6[variant].get(atk)
    if d["name"] == "jpeg":
        q = int(params.get("quality", 10))
        if large:
            return None
        if q == 10:
            return _T2.get(atk, [None] * 8)[5]
        if q in (30, 50, 70) and atk in _T13:
            return _T13[atk][(30, 50, 70).index(q)]
        return None
    col = _DEF_COL.get(d["name"])
    if col is None or (d["name"] == "dvae" and params):
        return None
    if large:
        return _T5[atk][_T5_COLS.index(col)] if atk in _T5 and col in _T5_COLS else None
    return _T2[atk][_T2_COLS.index(col)] if atk in _T2 else None


# --- helpers -----------------------------------------------------------------------------------------------
def axis_label(cfg: dict[str, Any], axis: str) -> str:
    v = cfg.get(axis)
    if isinstance(v, dict):
        return str(v.get("label", v.get("name")))
    return str(cfg.get(f"{axis}_label", v))


def _fmt(vals: list[float], digits: int = 2) -> str:
    if not vals:
        return ""
    m = float(np.mean(vals))
    return f"{m:.{digits}f}" + (f" ± {float(np.std(vals)):.{digits}f}" if len(vals) > 1 else "")


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>|#~!])")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def md_escape(text: Any) -> str:
    """Markdown-inert text: markup characters backslash-escaped, line breaks flattened."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).splitlines()))


def csv_safe(text: Any) -> str:
    """A CSV cell a spreadsheet will not run: text starting with = + - @ (or tab/CR) gets a leading quote;
    plain numbers (``-0.69``) are left as they are."""
    s = str(text)
    return "'" + s if s[:1] in ("=", "+", "-", "@", "\t", "\r") and not _NUMBER.match(s) else s


class Table:
    def __init__(self, title: str, header: list[str], rows: list[list[str]], note: str = "") -> None:
        self.title, self.header, self.rows, self.note = title, header, rows, note

    def markdown(self) -> str:
        out = [f"### {md_escape(self.title)}", ""]
        out.append("| " + " | ".join(map(md_escape, self.header)) + " |")
        out.append("|" + "---|" * len(self.header))
        out += ["| " + " | ".join(map(md_escape, r)) + " |" for r in self.rows]
        if self.note:
            out += ["", md_escape(self.note)]
        return "\n".join(out) + "\n"

    def html(self) -> str:
        h = "".join(f"<th>{html.escape(c)}</th>" for c in self.header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in self.rows)
        note = f"<p class='note'>{html.escape(self.note)}</p>" if self.note else ""
        return f"<h3>{html.escape(self.title)}</h3><table><tr>{h}</tr>{body}</table>{note}"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow([csv_safe(c) for c in self.header])
        w.writerows([[csv_safe(c) for c in r] for r in self.rows])
        return buf.getvalue()


def _status_text(rows: list[dict[str, Any]]) -> str | None:
    st = {r["status"] for r in rows}
    if "done" in st:
        return None
    return "failed" if "failed" in st else "…"


def pivot(cells: list[dict[str, Any]], rows_axis: str, cols_axis: str, value: str = "final_acc",
          title: str = "", mean_row: bool = False, mean_col: bool = False, psnr_row: bool = False,
          with_paper: bool = False, digits: int = 2) -> Table:
    """Mean (± std over seeds) of ``value`` per (row label, column label); failed/pending cells marked."""
    row_keys: list[str] = []
    col_keys: list[str] = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in cells:
        rk, ck = axis_label(r["config"], rows_axis), axis_label(r["config"], cols_axis)
        row_keys += [rk] if rk not in row_keys else []
        col_keys += [ck] if ck not in col_keys else []
        groups[(rk, ck)].append(r)

    def vals(rk: str, ck: str, key: str = value) -> list[float]:
        return [float(r["results"][key]) for r in groups.get((rk, ck), [])
                if r["status"] == "done" and r["results"] and r["results"].get(key) is not None]

    body = []
    for rk in row_keys:
        line = [rk]
        for ck in col_keys:
            g = groups.get((rk, ck), [])
            txt = _fmt(vals(rk, ck), digits) or (_status_text(g) or "") if g else ""
            if with_paper and g:
                pv = paper_value(g[0]["config"])
                if pv is not None:
                    txt = f"{txt} ({pv:.2f})"
            line.append(txt)
        if mean_col:
            allv = [float(np.mean(vals(rk, ck))) for ck in col_keys if vals(rk, ck)]
            line.append(f"{np.mean(allv):.{digits}f}" if allv else "")
        body.append(line)
    if mean_row:
        line = ["Mean"]
        for ck in col_keys:
            allv = [float(np.mean(vals(rk, ck))) for rk in row_keys if vals(rk, ck)]
            line.append(f"{np.mean(allv):.{digits}f}" if allv else "")
        body.append(line + ([""] if mean_col else []))
    if psnr_row:
        line = ["PSNR (dB)"]
        for ck in col_keys:
            allv = [v for rk in row_keys for v in vals(rk, ck, "psnr")]
            line.append(f"{np.mean(allv):.1f}" if allv else "")
        body.insert(0, line + ([""] if mean_col else []))
    header = [f"{rows_axis} \\ {cols_axis}", *col_keys] + (["Mean"] if mean_col else [])
    note = "ours (paper's CIFAR-10 number)" if with_paper else ""
    return Table(title, header, body, note)


def _fig_to_png(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _labelled_lines(pts: dict[str, list[tuple[float, float, str]]], path: Path, title: str, xlabel: str,
                    logx: bool = False, figsize: tuple[float, float] = (6, 4), fontsize: int = 6) -> Path:
    """One line per attack through its (x, accuracy) points, each point labelled with its defense."""
    plt = _plt()
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
    return _fig_to_png(fig, path)


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
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 3.8))
    w = 0.8 / len(cols)
    for j, c in enumerate(cols):
        ax.bar(np.arange(len(rows)) + j * w, [num(r[1 + j]) for r in rows], w, label=c)
    ax.set_xticks(np.arange(len(rows)) + 0.4 - w / 2)
    ax.set_xticklabels([r[0] for r in rows], rotation=30, fontsize=7)
    ax.set_ylabel("clean test accuracy [%]")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=min(4, len(cols)))
    return _fig_to_png(fig, path)


def _purify_cpu_s(r: dict[str, Any]) -> float | None:
    """A cell's purification CPU seconds (fit + transform; every thread of the process), else its wall seconds;
    None for a cell that ran more than once (a resumed purifier times only its last part)."""
    if int(r.get("attempts") or 0) > 1:
        return None
    t = r.get("timings") or {}
    v = t.get("purify_cpu", t.get("purify"))
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def fig_frontier(cells: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Accuracy after purification vs the purification's CPU time: one colour per attack, one point per defense
    (mean over its seeds; a learned defense's cost is its fit + transform; w/o is left out)."""
    groups: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for r in cells:
        res, cpu = r["results"] or {}, _purify_cpu_s(r)
        if r["status"] != "done" or cpu is None or r["config"]["defense"]["name"] == "none":
            continue
        if res.get("final_acc") is not None:
            groups[(axis_label(r["config"], "attack"), axis_label(r["config"], "defense"))].append(
                (max(cpu / 60, 1e-3), float(res["final_acc"])))
    pts: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
    for (atk, d), v in groups.items():
        pts[atk].append((float(np.mean([c for c, _ in v])), float(np.mean([a for _, a in v])), d))
    return _labelled_lines(pts, path, title, "purification CPU time [min] (fit + transform)", logx=True,
                           figsize=(7, 4.5), fontsize=5) if pts else None


def frontier_table(cells: list[dict[str, Any]], title: str) -> Table:
    """Per defense: its purification CPU time (mean over the attacks), the accuracy on each attack, and the
    two numbers the targets are stated in: the largest gap to the clean set (w/o) over the effective poisons
    (w/o >= 10 points below clean) and the cost on the clean set."""
    defs: list[str] = []
    atks: list[str] = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    clean_atk = none_def = None
    for r in cells:
        a, d = axis_label(r["config"], "attack"), axis_label(r["config"], "defense")
        defs += [d] if d not in defs else []
        atks += [a] if a not in atks else []
        groups[(d, a)].append(r)
        clean_atk = a if r["config"]["attack"]["name"] == "none" else clean_atk
        none_def = d if r["config"]["defense"]["name"] == "none" else none_def

    def accs(d: str, a: str) -> list[float]:
        return _finite([(r["results"] or {}).get("final_acc") for r in groups.get((d, a), []) if r["status"] == "done"])

    def acc(d: str, a: str) -> float | None:
        v = accs(d, a)
        return float(np.mean(v)) if v else None

    def seeds(d: str) -> str:
        n = sorted({len({int(r["config"].get("seed", 0)) for r in groups.get((d, a), []) if r["status"] == "done"})
                    for a in atks} - {0})
        return "-" if not n else str(n[0]) if len(n) == 1 else f"{n[0]}-{n[-1]}"

    base = acc(none_def, clean_atk) if none_def and clean_atk else None
    effective = [a for a in atks if a != clean_atk and base is not None and none_def is not None
                 and (v := acc(none_def, a)) is not None and base - v >= 10]
    body = []
    for d in defs:
        cpu = _finite([_purify_cpu_s(r) for a in atks for r in groups.get((d, a), []) if r["status"] == "done"])
        gaps = [base - v for a in effective if base is not None and (v := acc(d, a)) is not None]
        clean = acc(d, clean_atk) if clean_atk else None
        body.append([d, f"{np.mean(cpu) / 60:.2f}" if cpu and d != none_def else "-", seeds(d),
                     *[_fmt(accs(d, a)) or "-" for a in atks],
                     f"{max(gaps):.2f}" if gaps and len(gaps) == len(effective) else "-",
                     f"{base - clean:.2f}" if base is not None and clean is not None else "-"])
    header = ["defense", "purify CPU min (mean)", "seeds", *atks, "worst gap to clean (effective)",
              "clean-set cost"]
    note = ("CPU time: fit + transform of the purifier, all its threads, mean over the attacks it ran on in one go "
            "(a resumed cell times only its last part and is left out; wall time moves with the machine's load). "
            "Accuracies: mean ± std over the seeds (the number of seeds per attack, or its range); gaps and costs "
            "from the means. "
            "effective poisons: " + (", ".join(effective) or "none")
            + (f"; clean (w/o) {base:.2f}" if base is not None else "") + ".")
    return Table(title, header, body, note)


def fig_theorem2(res: dict[str, Any], path: Path) -> Path:
    plt = _plt()
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
    return _fig_to_png(fig, path)


# --- the report --------------------------------------------------------------------------------------------
def _metric_table(cells: list[dict[str, Any]], title: str, row_axes: list[str], cols: list[tuple[str, str]],
                  paper: Any = None, digits: int = 3) -> Table:
    """One row per distinct combination of ``row_axes``; columns are result keys (mean over seeds)."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in cells:
        groups[tuple(axis_label(r["config"], a) for a in row_axes)].append(r)
    body = []
    for k, g in groups.items():
        line = list(k)
        for key, _ in cols:
            v = [float(r["results"][key]) for r in g if r["status"] == "done" and r["results"].get(key) is not None]
            line.append(_fmt(v, digits) or (_status_text(g) or ""))
        if paper is not None:
            pv = paper(g[0]["config"])
            line.append("" if pv is None else " / ".join(f"{x:g}" for x in pv))
        body.append(line)
    header = [*row_axes, *(h for _, h in cols)] + (["paper (CIFAR-10)"] if paper is not None else [])
    return Table(title, header, body)


def _bound_text(info: dict[str, Any]) -> str:
    norm, eps = info.get("norm"), info.get("eps")
    if eps is None:
        return "-"
    if norm == "linf":
        return f"l_inf {eps * 255:.0f}/255"
    return f"l2 {eps:.3f}" if norm == "l2" else f"l0 {eps:.0f} px"


def efficacy_table(cells: list[dict[str, Any]], title: str) -> Table:
    """Attack efficacy, one row per attack (and defense, when a grid has several): the bound enforced, PSNR of
    the poisoned set to the clean one, the surrogate's accuracy on its own poison, clean test accuracy, its drop
    from the clean row (attack ``none``), accuracy without crop/flip (when measured) and the time to craft."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in cells:
        groups[(axis_label(r["config"], "attack"), axis_label(r["config"], "defense"))].append(r)
    several = len({d for _, d in groups}) > 1
    no_aug = any((r["results"] or {}).get("acc_no_aug") is not None for r in cells)

    def mean(g: list[dict[str, Any]], key: str) -> float | None:
        v = [float(r["results"][key]) for r in g if r["status"] == "done" and r["results"].get(key) is not None]
        return float(np.mean(v)) if v else None

    clean = {d: mean(g, "final_acc") for (a, d), g in groups.items() if g[0]["config"]["attack"]["name"] == "none"}
    body = []
    for (atk, dfn), g in groups.items():
        done = [r for r in g if r["status"] == "done"]
        info = (done[0]["results"].get("attack_info") or {}) if done else {}
        acc = mean(g, "final_acc")
        sur = next((info[k] for k in ("surrogate_acc_poisoned", "surrogate_acc") if info.get(k) is not None), None)
        sur_txt = "-" if sur is None else f"{sur:.1f}"
        if info.get("target_hit_rate") is not None:
            sur_txt += f" (target hit {info['target_hit_rate']:.1f})"
        base = clean.get(dfn)
        is_clean = g[0]["config"]["attack"]["name"] == "none"
        psnr_a, craft, plain = mean(g, "psnr_attack"), mean(g, "craft_s"), mean(g, "acc_no_aug")
        line = [atk] + ([dfn] if several else []) + [
            _bound_text(info), "-" if is_clean or psnr_a is None else f"{psnr_a:.2f}", sur_txt,
            _fmt([acc], 2) if acc is not None else (_status_text(g) or ""),
            "-" if is_clean or acc is None or base is None else f"{base - acc:.1f}"]
        if no_aug:
            line.append("" if plain is None else f"{plain:.2f}")
        line.append("-" if is_clean or craft is None else f"{craft:.0f}")
        body.append(line)
    header = ["attack"] + (["defense"] if several else []) + [
        "bound", "PSNR (dB)", "surrogate acc on poison (%)", "test acc (%)", "drop (pts)"]
    header += (["test acc, no crop/flip (%)"] if no_aug else []) + ["craft (s)"]
    return Table(title, header, body)


# --- measured against the clean images -----------------------------------------------------------------------
def _finite(vals: list[Any]) -> list[float]:
    return [float(v) for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]


def _dig(res: dict[str, Any] | None, *path: str) -> Any:
    cur: Any = res or {}
    for k in path:
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur


def _mean_text(vals: list[Any], digits: int = 3, pct: bool = False) -> str:
    v = _finite(vals)
    if not v:
        inf = [x for x in vals if isinstance(x, (int, float)) and math.isinf(x)]
        return ("inf" if inf[0] > 0 else "-inf") if inf and len(inf) == len(vals) else "-"
    if pct:
        v = [x * 100 for x in v]
        return _fmt(v, 1) + "%"
    return _fmt(v, digits)


def _measure_axes(cells: list[dict[str, Any]]) -> list[str]:
    axes = ["attack", "defense"]
    if len({str(r["config"].get("ratio")) for r in cells}) > 1:
        axes.append("ratio")
    return axes


def measurement_tables(cells: list[dict[str, Any]], where: str) -> list[tuple[str, Table]]:
    """Stage 1's ``p_hat`` against the true perturbation, and every stage against the clean images, one row per
    (attack, defense[, ratio]) and block (all images; the poisoned ones under partial poisoning), mean over seeds."""
    measured = [r for r in cells if r["status"] == "done" and _dig(r["results"], "disentangle", "all")]
    if not measured:
        return []
    axes = _measure_axes(measured)
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in measured:
        groups[tuple(axis_label(r["config"], a) for a in axes)].append(r)
    blocks = ["all"] + (["subset"] if any(_dig(r["results"], "disentangle", "subset") for r in measured) else [])
    s1_body, st_body = [], []
    inputs_seen: set[tuple[Any, ...]] = set()
    for key, g in groups.items():
        for block in blocks:
            reps = [r["results"]["disentangle"].get(block) for r in g]
            reps = [b for b in reps if b]
            if not reps:
                continue
            name = "all" if block == "all" else "poisoned"
            if any(b.get("p_hat") for b in reps):
                ph = [b["p_hat"] for b in reps if b.get("p_hat")]
                cc = [float(np.mean(_finite(list((x.get("class_corr") or {}).values())) or [float("nan")]))
                      for x in ph]
                s1_body.append([*key, name, str(reps[0]["n"])] + [
                    _mean_text([x["corr"][q] for x in ph]) for q in ("mean", "q25", "median", "q75")] + [
                    _mean_text([x["energy_removed"] for x in ph], pct=True), _mean_text([x["share"] for x in ph]),
                    _mean_text(cc), _mean_text([b["p_l2"]["mean"] for b in reps]),
                    _mean_text([x["p_hat_l2"]["mean"] for x in ph])])
            for stage in reps[0]["stages"]:
                st = [b["stages"][stage] for b in reps if stage in b["stages"]]
                row_key = list(key)
                if stage == "input":  # the poisoned set itself: the same for every defense, shown once
                    row_key[1] = "(any)"
                    if (tuple(row_key), name) in inputs_seen:
                        continue
                    inputs_seen.add((tuple(row_key), name))
                st_body.append([*row_key, name, stage, _mean_text([x["psnr_to_clean"] for x in st], 2),
                                _mean_text([x["poison_left_share"] for x in st]),
                                _mean_text([x["poison_left_corr"]["mean"] for x in st])])
    out: list[tuple[str, Table]] = []
    if s1_body:
        out.append(("stage1", Table(f"Stage 1: p_hat against the true perturbation p = poisoned - clean — {where}",
                         [*axes, "images", "n", "corr(p_hat, p) mean", "q25", "median", "q75", "energy removed",
                          "share of p in p_hat", "class-mean corr", "mean l2 of p", "mean l2 of p_hat"], s1_body,
                         "corr: per image (images without poison left out); energy removed: 1 - ||p - p_hat||² / "
                         "||p||² over the images (negative: subtracting p_hat adds error); l2 in [0, 1] pixel units")))
    out.append(("stages", Table(f"Every stage against the clean images — {where}",
                     [*axes, "images", "stage", "PSNR to clean (dB)", "poison left (share of p)",
                      "corr(stage - clean, p)"], st_body,
                     "poison left: <stage - clean, p> / <p, p> (1 = all of it, 0 = none); '-' where there is no "
                     "poison (the clean set)")))
    return out


def _is_full_dvae(cfg: dict[str, Any]) -> bool:
    """The whole method (both stages, subtraction in stage 2), not one of its ablations."""
    d = cfg["defense"]
    params = d.get("params") or {}
    return d["name"] == "dvae" and not params.get("skip_stage1") and params.get("stage2_subtract", True) is not False


def ablation_table(cells: list[dict[str, Any]], title: str) -> Table:
    """Tables 5-6 shape: defenses x attacks, accuracy with stage 1's corr(p_hat, p) and energy removed in each
    cell, the mean over the poisons and over the effective ones (defense ``none`` loses >= 10 points to the
    clean set), the best defense per attack, and a note saying where each defense wins and what the clean set
    costs."""
    defs: list[str] = []
    atks: list[str] = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    clean_atk: str | None = None
    none_def: str | None = None
    full: set[str] = set()
    for r in cells:
        a, d = axis_label(r["config"], "attack"), axis_label(r["config"], "defense")
        defs += [d] if d not in defs else []
        atks += [a] if a not in atks else []
        groups[(d, a)].append(r)
        if r["config"]["attack"]["name"] == "none":
            clean_atk = a
        if r["config"]["defense"]["name"] == "none":
            none_def = d
        if _is_full_dvae(r["config"]):
            full.add(d)

    def val(d: str, a: str, key: str = "final_acc") -> float | None:
        v = _finite([(r["results"] or {}).get(key) for r in groups.get((d, a), []) if r["status"] == "done"])
        return float(np.mean(v)) if v else None

    poisons = [a for a in atks if a != clean_atk]
    base = val(none_def, clean_atk) if none_def and clean_atk else None
    effective = [a for a in poisons if base is not None and none_def is not None
                 and val(none_def, a) is not None and base - val(none_def, a) >= 10]  # type: ignore[operator]
    body = []
    for d in defs:
        line = [d]
        for a in atks:
            acc = val(d, a)
            if acc is None:
                line.append(_status_text(groups.get((d, a), [])) or "" if groups.get((d, a)) else "")
                continue
            txt = f"{acc:.2f}"
            r_, e_ = val(d, a, "stage1_corr"), val(d, a, "stage1_energy_removed")
            if r_ is not None or e_ is not None:
                txt += f" [r {'-' if r_ is None else f'{r_:.2f}'}, E {'-' if e_ is None else f'{e_:.0%}'}]"
            line.append(txt)
        for subset in (poisons, effective):
            v = [val(d, a) for a in subset]
            line.append(f"{np.mean(v):.2f}" if subset and all(x is not None for x in v) else "-")
        body.append(line)
    best_line = ["best"]
    wins: dict[str, list[str]] = defaultdict(list)
    for a in atks:
        scored = [(val(d, a), d) for d in defs if val(d, a) is not None and d != none_def]
        if not scored:
            best_line.append("")
            continue
        top = max(v for v, _ in scored)
        winners = [d for v, d in scored if v >= top - 1e-9]
        best_line.append(" / ".join(winners))
        for w in winners:
            wins[w].append(a)
    body.append(best_line + ["", ""])
    notes = ["cell: clean test accuracy (%) [r = corr(p_hat, p) per image, mean; E = poison energy stage 1 removed, "
             "1 - ||p - p_hat||²/||p||²]."]
    notes.append("effective poisons (w/o defense, >= 10 points below the clean set): "
                 + (", ".join(effective) if effective else "none") + ".")
    rates = _rates(cells)
    if rates:
        notes.append("rates (KLD limits, nats): " + "; ".join(f"{d}: {r}" for d, r in rates.items()) + ".")
    won = "; ".join(f"{d} on {', '.join(a)}" for d, a in wins.items())
    notes.append(f"wins (best accuracy; w/o excluded): {won or '-'}.")
    if base is not None and clean_atk is not None:
        cost = [f"{d} {base - v:.2f}" for d in defs if d != none_def and (v := val(d, clean_atk)) is not None]
        notes.append(f"cost on the clean set (points below w/o, {base:.2f}): " + (", ".join(cost) or "-") + ".")
        for d in sorted(full):
            gaps = [f"{a} {base - v:.2f}" for a in effective if (v := val(d, a)) is not None]
            if gaps:
                notes.append(f"{d}: points below clean on the effective poisons: {', '.join(gaps)}.")
    header = ["defense \\ attack", *atks, "Mean (poisons)", "Mean (effective)"]
    return Table(title, header, body, " ".join(notes))


def _rates(cells: list[dict[str, Any]]) -> dict[str, str]:
    """The KLD limits each VAE-family defense actually ran with (from its recorded config), so "at the same rate"
    is checked on the numbers, not on the labels."""
    out: dict[str, str] = {}
    for r in cells:
        cfg = _dig(r["results"], "defense_info", "config")
        name = r["config"]["defense"]["name"]
        d = axis_label(r["config"], "defense")
        if not isinstance(cfg, dict) or d in out:
            continue
        applied = _dig(r["results"], "defense_info", "kld_limits") or {}  # after rate_rule
        if name == "dvae":
            s1 = "" if cfg.get("skip_stage1") else f"stage 1 {_g(applied.get('stage1', cfg.get('kld_limit1')))}, "
            out[d] = f"{s1}stage 2 {_g(applied.get('stage2', cfg.get('kld_limit2')))}"
        elif name == "vae":
            out[d] = f"{_g(applied.get('vae', cfg.get('kld_limit')))}"
    return out


def _g(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def disentangle_check_table(cells: list[dict[str, Any]], title: str) -> Table:
    """Per attack: stage 1's corr(p_hat, p) and energy removed beside the Table 1 accuracies of a classifier
    trained on clean + p_hat (T, D, P) and the PSNR of the output to the clean images."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in cells:
        groups[axis_label(r["config"], "attack")].append(r)
    body = []
    for atk, g in groups.items():
        done = [r["results"] for r in g if r["status"] == "done" and r["results"]]
        if not done:
            body.append([atk] + [_status_text(g) or ""] * 7)
            continue
        body.append([atk, _mean_text([x.get("stage1_corr") for x in done]),
                     _mean_text([x.get("stage1_energy_removed") for x in done], pct=True),
                     _mean_text([x.get("poison_left") for x in done]),
                     _mean_text([x.get("psnr_clean") for x in done], 2),
                     _mean_text([x.get("acc_clean_train") for x in done], 2),
                     _mean_text([x.get("acc_clean_test") for x in done], 2),
                     _mean_text([x.get("acc_poisoned_train") for x in done], 2)])
    return Table(title, ["attack", "stage-1 corr(p_hat, p)", "energy removed", "poison left (output)",
                         "PSNR output to clean (dB)", "T: clean train", "D: clean test", "P: poisoned"], body,
                 "T, D, P: accuracy (%) of a classifier trained on clean + p_hat (the paper's Table 1): p_hat that is "
                 "the poison gives a low D and a high P.")


def file_tag(spec: str, model: Any = None) -> str:
    """A file-name part for a (dataset, model) group: a readable stem of the spec plus a hash of the whole
    spec, so no raw path (``..``, separators, odd characters) ever reaches a file name."""
    last = re.split(r"[/\\]", str(spec).rstrip("/\\"))[-1]
    m = re.match(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}", last)
    stem = m.group(0) if m else "data"
    tag = f"{stem}-{hashlib.sha256(str(spec).encode()).hexdigest()[:6]}"
    return tag if model is None else f"{tag}-{_safe(str(model))[:32]}"


def _t7(cfg: dict[str, Any]) -> tuple[float, ...] | None:
    if not is_cifar10(cfg.get("dataset", "")):
        return None
    return _T7.get((cfg["attack"]["name"], round(float(cfg.get("ratio", 1.0)), 2)))


@dataclass
class ReportContext:
    """What a kind's report section may read besides its own rows: the grid's folders, metadata and layout."""

    outdir: Path
    rdir: Path
    meta: dict[str, Any]
    spec: dict[str, Any]
    title: str


#: a report section's output: named tables, captioned figures, captioned image grids
Section = tuple[list[tuple[str, Table]], list[tuple[str, Path]], list[tuple[str, Path]]]
SectionFn = Callable[[list[dict[str, Any]], ReportContext], Section]
#: kind names of stores written by older versions, reported by the section of today's kind
_LEGACY_KINDS = {"disentangle": "disentangle-check"}


def _by_run(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    out: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[(str(r["config"]["dataset"]), str(r["config"]["model"]))].append(r)
    return out


def purify_section(rows: list[dict[str, Any]], rc: ReportContext) -> Section:
    """Tables 2/5/6/13 and Fig. 2/6: accuracy per attack and defense, PSNR, the per-stage measurements."""
    tables: list[tuple[str, Table]] = []
    figures: list[tuple[str, Path]] = []
    spec, title, rdir, meta = rc.spec, rc.title, rc.rdir, rc.meta
    for (ds, model), cells in _by_run(rows).items():
        tag = file_tag(ds, model)
        if spec.get("layout") == "efficacy":
            tables.append((f"{meta.get('name')}-{tag}", efficacy_table(cells, f"{title} — {ds}, {model}")))
            continue
        if spec.get("layout") in ("ablation", "frontier"):
            tables.append((f"{meta.get('name')}-{tag}", ablation_table(cells, f"{title} — {ds}, {model}")))
            if spec.get("layout") == "frontier":
                tables.append((f"frontier-{tag}", frontier_table(cells, f"Quality vs compute — {ds}, {model}")))
                p = fig_frontier(cells, rdir / "figures" / f"frontier-{tag}.png",
                                 f"accuracy vs purification CPU time — {ds}, {model}")
                if p:
                    figures.append((f"Accuracy vs purification CPU time ({ds}, {model})", p))
            p = fig_bars(pivot(cells, "attack", "defense"), rdir / "figures" / f"bars-{tag}.png",
                         f"per-attack accuracy — {ds}, {model}")
            if p:
                figures.append((f"Per-attack accuracy ({ds}, {model})", p))
            tables += [(f"{n}-{tag}", t) for n, t in measurement_tables(cells, f"{ds}, {model}")]
            continue
        t = pivot(cells, spec.get("rows", "attack"), spec.get("cols", "defense"), title=f"{title} — {ds}, {model}",
                  mean_row=bool(spec.get("mean_row")), mean_col=bool(spec.get("mean_col")),
                  psnr_row=bool(spec.get("psnr_row")), with_paper=is_cifar10(ds) and model == "resnet18")
        tables.append((f"{meta.get('name')}-{tag}", t))
        p = fig_bars(t if spec.get("rows", "attack") == "attack" else
                     pivot(cells, "attack", "defense"), rdir / "figures" / f"bars-{tag}.png",
                     f"per-attack accuracy — {ds}, {model}")
        if p:
            figures.append((f"Per-attack accuracy ({ds}, {model})", p))
        p = fig_psnr_acc(cells, rdir / "figures" / f"psnr-acc-{tag}.png", f"PSNR vs accuracy — {ds}, {model}")
        if p:
            figures.append((f"PSNR vs accuracy ({ds}, {model})", p))
        if any(r["results"] and r["results"].get("psnr") is not None for r in cells):
            tables.append((f"psnr-{tag}", pivot(cells, spec.get("rows", "attack"), spec.get("cols", "defense"),
                                                value="psnr", title=f"PSNR(poisoned, purified) dB — {ds}, {model}")))
        tables += [(f"{n}-{tag}", t) for n, t in measurement_tables(cells, f"{ds}, {model}")]
    return tables, figures, []


def disentangle_section(rows: list[dict[str, Any]], rc: ReportContext) -> Section:
    """Table 1 (clean + p_hat still poisons) and, where measured, how much poison each stage removed."""
    tables: list[tuple[str, Table]] = []
    for (ds, model), cells in _by_run(rows).items():
        body = []
        for key, name in (("acc_clean_train", "clean train T"), ("acc_clean_test", "clean test D"),
                          ("acc_poisoned_train", "poisoned P")):
            body.append([name] + pivot(cells, "model", "attack", value=key).rows[0][1:])
        atks = pivot(cells, "model", "attack").header[1:]
        t = Table(f"Table 1: accuracy (%) of a model trained on clean + p_hat — {ds}, {model}", ["test set", *atks],
                  body)
        tag = file_tag(ds, model)
        tables.append((f"table1-{tag}", t))
        if any(_dig(r["results"], "disentangle", "all") for r in cells):
            tables.append((f"disentangle-{tag}", disentangle_check_table(
                cells, f"Does stage 1 take the poison out? — {ds}, {model}")))
            tables += [(f"{n}-{tag}", t) for n, t in measurement_tables(cells, f"{ds}, {model}")]
    return tables, [], []


def detect_section(rows: list[dict[str, Any]], rc: ReportContext) -> Section:
    """Table 7: poisoned-sample detection."""
    tables: list[tuple[str, Table]] = []
    for (ds, model), cells in _by_run(rows).items():
        t = _metric_table(cells, f"Table 7: poisoned-sample detection — {ds}, {model}", ["attack", "ratio"],
                          [("det_acc", "Acc."), ("recall", "Recall"), ("precision", "Precision"), ("f1", "F1")],
                          paper=_t7 if is_cifar10(ds) else None)
        tables.append((f"table7-{file_tag(ds, model)}", t))
    return tables, [], []


def partial_section(rows: list[dict[str, Any]], rc: ReportContext) -> Section:
    """Table 8: accuracy under partial poisoning, per attack, defense and ratio."""
    tables: list[tuple[str, Table]] = []
    for (ds, model), cells in _by_run(rows).items():
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in cells:
            groups[axis_label(r["config"], "attack")].append(r)
        body = []
        header: list[str] = []
        for atk, g in groups.items():
            t = pivot(g, "defense", "ratio")
            header = ["attack", *t.header]
            body += [[atk, *row] for row in t.rows]
        tables.append((f"table8-{file_tag(ds, model)}",
                       Table(f"Table 8: accuracy (%) under partial poisoning — {ds}, {model}", header, body)))
    return tables, [], []


def amplify_section(rows: list[dict[str, Any]], rc: ReportContext) -> Section:
    """Sec. 5.2: the D-VAE-amplified poison."""
    tables: list[tuple[str, Table]] = []
    for (ds, model), cells in _by_run(rows).items():
        t = _metric_table(cells, f"Sec. 5.2: D-VAE-amplified poison — {ds}, {model}", ["attack", "ratio"],
                          [("final_acc", "test acc. (amplified)"),
                           ("acc_small_poison_only", "test acc. (small poison)")],
                          digits=2)
        tables.append((f"amplify-{file_tag(ds, model)}", t))
    return tables, [], []


def theorem2_section(rows: list[dict[str, Any]], rc: ReportContext) -> Section:
    """Theorem 2's bounds against the numerical KLD, table and plot (the first finished cell)."""
    tables: list[tuple[str, Table]] = []
    figures: list[tuple[str, Path]] = []
    for r in rows:
        if r["status"] == "done":
            res = r["results"]
            body = [[f"{x['r']:.4g}", f"{x['lower']:.6f}", f"{x['kld']:.6f}", f"{x['upper']:.6f}",
                     "yes" if x["holds"] else "NO"] for x in res["rows"]]
            tables.append(("theorem2", Table(
                "Theorem 2: ½ln(1+r²) − ln2 ≤ KLD ≤ ½ln(1+r²)", ["r", "lower", "KLD (numerical)", "upper", "holds"],
                body, f"all hold: {res['all_hold']}; KLD increasing in r: {res['kld_increasing_in_r']}")))
            figures.append(("Theorem 2", fig_theorem2(res, rc.rdir / "figures" / "theorem2.png")))
            break
    return tables, figures, []


def diffusion_section(rows: list[dict[str, Any]], rc: ReportContext) -> Section:
    """The dependency cells: the diffusion models AVATAR denoises with."""
    deps = rows
    tables: list[tuple[str, Table]] = []
    if deps:
        tables.append(("dependencies", Table(
            "Dependencies: diffusion models the AVATAR cells denoise with",
            ["cell", "status", "final loss", "parameters (M)"],
            [[r["key"], r["status"], _num_text((r["results"] or {}).get("final_loss"), "{:.4f}"),
              _num_text((r["results"] or {}).get("parameters"), "{:.2f}", 1e-6)] for r in deps])))
    return tables, [], []


def build_report(outdir: str | Path) -> Path:
    """Write ``OUTDIR/report/`` from the store; return the path of ``index.html``."""
    outdir = Path(outdir)
    store = Store.open_existing(outdir)
    try:
        meta, cfg, rows = store.meta(), store.config(), store.rows()
        counts = store.status_counts()
    finally:
        store.close()
    rdir = outdir / "report"
    (rdir / "tables").mkdir(parents=True, exist_ok=True)
    (rdir / "figures").mkdir(parents=True, exist_ok=True)
    title = meta.get("title") or meta.get("name")
    spec = cfg.get("table") or {}
    tables: list[tuple[str, Table]] = []
    figures: list[tuple[str, Path]] = []

    from .run import KINDS  # each kind names its section where it is defined (run imports this module)

    rc = ReportContext(outdir, rdir, meta, spec, title)
    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_kind[_LEGACY_KINDS.get(r["config"]["kind"], r["config"]["kind"])].append(r)
    section_grids: list[tuple[str, Path]] = []
    for name in KINDS.in_order():
        section = KINDS.get(name).report
        if section is not None and by_kind.get(name):
            t, f, g = section(by_kind[name], rc)
            tables += t
            figures += f
            section_grids += g
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        tables.append(("failed", Table("Failed cells", ["cell", "error"],
                                       [[r["key"], (r["error"] or "").splitlines()[0][:200]] for r in failed])))
    grids = [(r["key"], outdir / "cells" / r["cell_id"] / "grid.png") for r in rows
             if (outdir / "cells" / r["cell_id"] / "grid.png").exists()][:16]
    # residual grids (p, p_hat, p - p_hat): the cells with a stage-1 p_hat first
    res = sorted((r for r in rows if (outdir / "cells" / r["cell_id"] / "residual.png").exists()),
                 key=lambda r: (r["results"] or {}).get("stage1_corr") is None)
    grids += [(f"{r['key']} — p, p_hat, p - p_hat", outdir / "cells" / r["cell_id"] / "residual.png")
              for r in res][:16]
    grids += section_grids[:40]
    for name, t in tables:
        write_text_atomic(rdir / "tables" / f"{_safe(name)}.csv", t.csv())
    timings = [r["timings"].get("total", 0.0) for r in rows if r["timings"]]
    summary = (f"grid **{meta.get('name')}** (preset {meta.get('preset')}, fingerprint {meta.get('fingerprint')}): "
               f"{len(rows)} cells — " + ", ".join(f"{k} {v}" for k, v in counts.items()) +
               f"; cell time total {sum(timings) / 60:.1f} min")
    note = str(cfg.get("note") or "")
    md = [f"# {md_escape(title)}", "", md_escape(summary).replace("\\*\\*", "**"), ""]
    md += [md_escape(note), ""] if note else []
    md += [t.markdown() for _, t in tables]
    md += [f"![{md_escape(n)}](figures/{p.name})" for n, p in figures]
    md += ["", "## Image grids", ""] + [f"- {md_escape(k)}: `{p.relative_to(outdir)}`" for k, p in grids]
    write_text_atomic(rdir / "report.md", "\n".join(md) + "\n")
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;"
            "margin-bottom:1em}td,th{border:1px solid #bbb;padding:3px 7px;font-size:13px;text-align:right}"
            "td:first-child{text-align:left}.note{color:#666;font-size:12px}img{max-width:100%}</style></head><body>",
            f"<h1>{html.escape(title)}</h1><p>{html.escape(summary.replace('**', ''))}</p>"]
    page += [f"<p class='note'>{html.escape(note)}</p>"] if note else []
    page += [t.html() for _, t in tables]
    for n, p in figures:
        page.append(f"<h3>{html.escape(n)}</h3>{_img(p)}")
    if grids:
        page.append("<h2>Image grids</h2>")
        page += [f"<h4>{html.escape(k)}</h4>{_img(p)}" for k, p in grids]
    page.append("</body></html>")
    out = rdir / "index.html"
    write_text_atomic(out, "\n".join(page))
    return out


def _num_text(v: Any, fmt: str, scale: float = 1.0) -> str:
    return fmt.format(float(v) * scale) if isinstance(v, (int, float)) else ""


def _img(p: Path) -> str:
    return f"<img src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'>"


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
