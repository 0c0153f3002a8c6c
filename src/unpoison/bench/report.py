"""Turn a results store into the paper's tables and figures: Markdown, CSV, PNG and one HTML page.

Writes ``OUTDIR/report/``: ``report.md``, ``index.html`` (self-contained: images inlined as base64),
``tables/*.csv`` and ``figures/*.png``. Each cell kind names the section that lays its rows out
(:mod:`unpoison.bench.sections`, :mod:`unpoison.bench.report_scan`); this module puts the sections together in
the order the kinds are defined, adds the failed cells and the image grids, and writes the page. Tables follow the
paper's shapes (Table 2: attacks x defenses; Table 5: larger bounds; Table 6: ablation variants x attacks with a
mean; Table 13: JPEG qualities with a PSNR row; Table 1/7/8 and Sec. 5.2 for the other kinds); on CIFAR-10 the
paper's numbers are printed beside ours as ``ours (paper)``. Accuracies are the mean over seeds (``± std`` when
there are several). ``table: {layout: ...}`` picks a purify grid's shape: ``ablation`` (accuracy with stage 1's
corr and energy removed, means, best defense per attack), ``frontier`` (that, plus each defense's purification
CPU time and accuracy against it), ``efficacy`` (per attack: bound, PSNR, surrogate accuracy, drop vs clean,
craft time).
"""

from __future__ import annotations

import base64
import html
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..utils import write_text_atomic
from .kinds import KINDS
from .sections import ReportContext
from .store import Store
from .table import Table, md_escape, num, safe_name

#: kind names of stores written by older versions, reported by the section of today's kind
_LEGACY_KINDS = {"disentangle": "disentangle-check"}


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
        write_text_atomic(rdir / "tables" / f"{safe_name(name)}.csv", t.csv())
    timings = [r["timings"].get("total", 0.0) for r in rows if r["timings"]]
    summary = (f"grid **{meta.get('name')}** (preset {meta.get('preset')}, fingerprint {meta.get('fingerprint')}): "
               f"{len(rows)} cells — " + ", ".join(f"{k} {v}" for k, v in counts.items()) +
               f"; cell time total {num(sum(timings) / 60, '.1f')} min")
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


def _img(p: Path) -> str:
    return f"<img src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'>"
