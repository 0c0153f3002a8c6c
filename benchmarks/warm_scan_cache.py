"""Craft the scan grid's poisons into its bench cache ahead of the run (slowest last), so that
``unpoison bench scan OUTDIR --preset cpu`` finds every poisoned set made: the cache is keyed by content
(dataset digest, subset, attack, parameters, ratio, seed, code), exactly as the cells key it.

    python benchmarks/warm_scan_cache.py runs/scan-cpu [--preset cpu] [--only em,tap]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from unpoison.bench.cell import CellContext
from unpoison.bench.grid import expand, load_config

ORDER = ["none", "lsp", "ops", "ar", "ntga", "em", "tap", "sep", "rem"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("outdir")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--only", default=None, help="comma-separated attack names")
    a = ap.parse_args()
    cells = expand(load_config("scan", a.preset))
    only = set(a.only.split(",")) if a.only else None
    cells = [c for c in cells if c.config["attack"]["name"] != "none"
             and (only is None or c.config["attack"]["name"] in only)]
    cells.sort(key=lambda c: (ORDER.index(c.config["attack"]["name"]), float(c.config.get("ratio", 1.0))))
    for cell in cells:
        ctx = CellContext(cell, Path(a.outdir), progress=False)
        t0 = time.time()
        ds = ctx.data()
        _, idx, _ = ctx.poison(ds, ratio=float(cell.config.get("ratio", 1.0)))
        hit = ctx.extra["attack_cache"][-1]["hit"]
        print(f"{cell.key}: {len(idx)} poisoned of {len(ds.x_train)} in {time.time() - t0:.0f}s"
              f"{' (cached)' if hit else ''}", flush=True)


if __name__ == "__main__":
    main()
