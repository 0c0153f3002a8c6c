"""``unpoison report OUTDIR``: the paper's tables (Markdown + CSV), figures (PNG) and one HTML page.

Reads OUTDIR/results.sqlite (written by ``unpoison bench``; works on a partly finished grid too)
and writes OUTDIR/report/: report.md, index.html (self-contained), tables/*.csv, figures/*.png.
"""

from __future__ import annotations

import argparse

from ..bench import build_report


def add_parser(sub: argparse._SubParsersAction, name: str, argv: list[str] | None = None) -> None:
    p = sub.add_parser(name, help="tables and figures from a benchmark's results", description=__doc__)
    p.add_argument("outdir", help="a folder written by 'unpoison bench'")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = build_report(args.outdir)
    print(f"wrote {out.parent}/ (report.md, index.html, tables/, figures/)")
    return 0
