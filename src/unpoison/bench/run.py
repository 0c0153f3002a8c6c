"""Run one benchmark cell (the worker entry point every executor calls): its kind's experiment function
(:mod:`unpoison.bench.kinds`) in a :class:`~unpoison.bench.cell.CellContext`, never raising for a failing cell.

Every cell writes ``OUTDIR/cells/<id>/manifest.json`` (and an image grid for purifying cells) and returns a record
``{status, results, manifest, timings, error, data_digest}`` that the driver puts in the store.
"""

from __future__ import annotations

import contextlib
import os
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from ..utils import manifest, write_json
from .cell import CellContext
from .grid import Cell, import_plugins
from .kinds import KINDS


def run_cell(cell: Cell | dict[str, Any], outdir: str | Path, progress: bool = False,
             threads: int | None = None) -> dict[str, Any]:
    """Run one cell and return its record; never raises for a failing cell (the grid goes on)."""
    if isinstance(cell, dict):
        cell = Cell(**cell)
    outdir = Path(outdir)
    t0 = time.time()
    if threads:
        torch.set_num_threads(max(1, int(threads)))
    ctx: CellContext | None = None
    try:
        import_plugins(cell.config.get("plugins") or [])
        ctx = CellContext(cell, outdir, progress)
        ctx.dir.mkdir(parents=True, exist_ok=True)
        results = KINDS.get(cell.config["kind"]).fn(ctx)
        rec = {"status": "done", "results": results, "timings": ctx.timer.times, "error": None}
    except Exception as e:  # noqa: BLE001 - a failing cell is recorded, the grid goes on
        rec = {"status": "failed", "results": {}, "timings": ctx.timer.times if ctx else {},
               "error": f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"}
    rec["timings"] = {**rec["timings"], "total": time.time() - t0}
    rec["data_digest"] = ctx.digest if ctx and ctx.digest else cell.data
    rec["manifest"] = manifest("bench-cell", {"key": cell.key, **cell.config}, int(cell.config.get("seed", 0)),
                               rec["timings"], status=rec["status"], cell_id=cell.id, pid=os.getpid(),
                               data_digest=rec["data_digest"], **({"cache": ctx.extra} if ctx else {}))
    rec["manifest"].pop("argv", None)
    with contextlib.suppress(OSError):
        write_json(outdir / "cells" / cell.id / "manifest.json",
                   {**rec["manifest"], "results": rec["results"], "error": rec["error"]})
    return rec
