"""The report's section for ``scan`` cells: the verdict table (score, each signal's z, per-sample P/R/F1)
and a picture of the evidence (every cell's score against the threshold; the cells' own evidence PNGs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .figures import fig_to_png, pyplot
from .sections import ReportContext, Section
from .table import Table, axis_label, num


def scan_table(cells: list[dict[str, Any]], title: str) -> Table:
    """One row per cell: data size, attack, ratio, verdict, kind, score, z per signal, detection metrics."""
    sig: list[str] = []
    for r in cells:
        for s in (r["results"] or {}).get("z", {}):
            sig += [s] if s not in sig else []
    body = []
    for r in sorted(cells, key=_order):
        c, res = r["config"], r["results"] or {}
        clean = c["attack"]["name"] == "none"
        sub = c.get("subset") or {}
        line = [axis_label(c, "attack"), "-" if clean else num(float(c.get("ratio", 1.0)), "g"),
                str(res.get("n", sub.get("n_train", ""))), str(sub.get("seed", 0))]
        if r["status"] != "done":
            body.append(line + [r["status"]] + [""] * (len(sig) + 6))
            continue
        line += ["POISONED" if res.get("poisoned") else "clean", res.get("kind") or "", num(res.get("score"), ".1f")]
        line += [num(res["z"].get(s), "+.1f") for s in sig]
        line += [num(res.get(k), ".3f") for k in ("precision", "recall", "f1")]
        line.append(num((r.get("timings") or {}).get("scan"), ".1f"))
        body.append(line)
    header = ["attack", "ratio", "n", "subset seed", "verdict", "kind", "score", *(f"z {s}" for s in sig),
              "precision", "recall", "F1", "scan (s)"]
    thr = next(((r["results"] or {}).get("threshold") for r in cells if r["results"]), None)
    note = (f"score = largest |z| of the signals against the clean null; poisoned when >= {num(thr, 'g')}. "
            "Precision/recall/F1: the per-sample flags against the poisoned indices." if thr else "")
    return Table(title, header, body, note)


def _order(r: dict[str, Any]) -> tuple[Any, ...]:
    c = r["config"]
    sub = c.get("subset") or {}
    return (c["attack"]["name"] != "none", c["attack"]["name"], float(c.get("ratio", 1.0)), sub.get("n_train", 0),
            sub.get("seed", 0))


def fig_scan_scores(cells: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Every cell's score (log scale) against the threshold: clean subsets grey, poisoned sets by ratio."""
    done = sorted((r for r in cells if r["status"] == "done" and r["results"]), key=_order)
    if not done:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(done)), 3.6))
    colors = {0.1: "tab:orange", 0.5: "tab:red", 1.0: "darkred"}
    labels, vals, cols = [], [], []
    for r in done:
        c, res = r["config"], r["results"]
        clean = c["attack"]["name"] == "none"
        ratio = float(c.get("ratio", 1.0))
        labels.append(f"clean n={res.get('n')}" if clean else f"{axis_label(c, 'attack')} {ratio:g}")
        vals.append(max(float(res.get("score", 0.0)), 1e-2))
        cols.append("tab:gray" if clean else colors.get(round(ratio, 2), "tab:red"))
    ax.bar(range(len(vals)), vals, color=cols)
    thr = done[0]["results"].get("threshold")
    if thr:
        ax.axhline(thr, color="k", ls="--", lw=0.8, label=f"threshold {thr:g}")
        ax.legend(fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(vals)))
    ax.set_xticklabels(labels, rotation=75, fontsize=7)
    ax.set_ylabel("scan score (max |z|)")
    ax.set_title(title, fontsize=10)
    return fig_to_png(fig, path)


def scan_section(cells: list[dict[str, Any]], rc: ReportContext) -> Section:
    """Tables, figures and the cells' evidence images for the ``scan`` cells of a grid."""
    outdir, rdir = rc.outdir, rc.rdir
    by_ds: dict[str, list[dict[str, Any]]] = {}
    for r in cells:
        by_ds.setdefault(str(r["config"]["dataset"]), []).append(r)
    tables, figures = [], []
    for ds, g in by_ds.items():
        tag = "".join(ch if ch.isalnum() else "_" for ch in ds)[:40]
        tables.append((f"scan-{tag}", scan_table(g, f"Scan: is this dataset poisoned? — {ds}")))
        p = fig_scan_scores(g, rdir / "figures" / f"scan-scores-{tag}.png", f"scan score per set — {ds}")
        if p:
            figures.append((f"Scan scores ({ds})", p))
    ev = [(f"{r['key']} — scan evidence", outdir / "cells" / r["cell_id"] / "evidence.png")
          for r in sorted(cells, key=_order) if (outdir / "cells" / r["cell_id"] / "evidence.png").exists()]
    return tables, figures, ev
