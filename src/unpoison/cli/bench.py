"""``unpoison bench CONFIG OUTDIR``: run (or resume) a benchmark grid into OUTDIR's results store.

CONFIG is a shipped config (see the list below) or a YAML file. Before its first cell, every run checks
every cell (parameters, files, models, datasets; ``--check`` does only that): a grid that cannot finish
does not start. A rerun skips finished cells (unless the data behind a dataset spec changed: those run
again) and resumes unfinished ones; a failing cell records its error and the grid goes on. ``unpoison
report OUTDIR`` makes the tables and figures. A config's ``plugins:`` (Python modules it would import)
run only with ``--allow-plugins``.
"""

from __future__ import annotations

import argparse
import sys

from ..bench import build_report, check_config, run_grid
from ..bench.executors import EXECUTORS
from ..bench.grid import BENCH_PRESETS, load_config, shipped_configs
from ..errors import UserError
from ._common import add_preset, add_quiet, announce_preset


def add_parser(sub: argparse._SubParsersAction, name: str, argv: list[str] | None = None) -> None:
    p = sub.add_parser(name, help="run a benchmark grid (resumable)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help=f"shipped config ({', '.join(shipped_configs())}) or a YAML path")
    p.add_argument("outdir", nargs="?", default=None,
                   help="results folder (results.sqlite, caches, per-cell manifests); not needed with --check")
    add_preset(p, [BENCH_PRESETS])
    p.add_argument("--check", action="store_true", help="only check every cell (nothing is run or written)")
    p.add_argument("--dataset", action="append", default=None, metavar="SPEC",
                   help="run on this dataset instead of the config's (repeatable; any dataset spec)")
    p.add_argument("--executor", choices=EXECUTORS.names(), default="local",
                   help="; ".join(f"{n}: {EXECUTORS.help(n)}" for n in EXECUTORS.names()))
    p.add_argument("--workers", type=int, default=1, help="parallel cells (local: processes; ray: local CPUs)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local instance)")
    p.add_argument("--skip-failed", action="store_true", help="do not retry cells that failed before")
    p.add_argument("--allow-plugins", action="store_true",
                   help="import the Python modules the config lists under 'plugins' (off: a config is data)")
    p.add_argument("--report", action="store_true", help="write OUTDIR/report/ when the grid ends")
    p.add_argument("--extend", action="store_true",
                   help="OUTDIR holds an earlier version of this grid (same name and preset): add the config's new "
                        "cells and keep the finished ones (a changed cell needs a new label)")
    add_quiet(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    preset = args.preset
    if preset != "auto" or load_config(args.config, None, args.dataset)["_presets"]:
        preset = announce_preset(args, [BENCH_PRESETS])  # auto on a config without presets: run as written
    if args.check:
        grid = check_config(args.config, preset, args.dataset, args.allow_plugins)
        for p in grid.problems:
            print(f"problem: {p}", file=sys.stderr)
        if grid.problems:
            raise UserError(f"{len(grid.problems)} problem(s) in {len(grid.cells)} cells; the grid would not start",
                            grid.config.get("_source"))
        datasets = sorted({str(c.config["dataset"]) for c in grid.cells if c.data})
        print(f"{grid.config.get('name')} (preset {grid.config.get('_preset') or 'none'}): {len(grid.cells)} cells "
              f"checked, no problems; data: {', '.join(datasets) or 'none'}")
        return 0
    if args.outdir is None:
        raise UserError("give OUTDIR (or --check)")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if args.address and args.executor != "ray":
        raise UserError("--address is for --executor ray")
    counts = run_grid(args.config, args.outdir, preset=preset, executor=args.executor, workers=args.workers,
                      address=args.address, progress=not args.quiet, retry_failed=not args.skip_failed,
                      datasets=args.dataset, allow_plugins=args.allow_plugins, extend=args.extend)
    print(f"{args.outdir}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if args.report:
        print(f"report: {build_report(args.outdir)}")
    return 1 if counts.get("failed") else 0
