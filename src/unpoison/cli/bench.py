"""``unpoison bench CONFIG OUTDIR``: run (or resume) a benchmark grid into OUTDIR's results store.

CONFIG is a shipped config (table2, ablation, kld-sweep, jpeg-sweep, disentangle-check, detect,
partial, amplify, theorem2) or a YAML file. A rerun skips finished cells and resumes unfinished
ones; a failing cell records its error and the grid goes on. ``unpoison report OUTDIR`` makes the
tables and figures.
"""

from __future__ import annotations

import argparse

from ._common import add_quiet


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    from ..bench.grid import PRESETS, shipped_configs

    p = sub.add_parser(name, help="run a benchmark grid (resumable)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help=f"shipped config ({', '.join(shipped_configs())}) or a YAML path")
    p.add_argument("outdir", help="results folder (results.sqlite, caches, per-cell manifests)")
    p.add_argument("--preset", choices=PRESETS, default=None,
                   help="smoke: tiny synthetic data, minutes on CPU; cpu: Fashion-MNIST subsets; paper: GPU")
    p.add_argument("--dataset", action="append", default=None, metavar="SPEC",
                   help="run on this dataset instead of the config's (repeatable; any dataset spec)")
    p.add_argument("--executor", choices=["local", "ray"], default="local")
    p.add_argument("--workers", type=int, default=1, help="parallel cells (local: processes; ray: local CPUs)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local instance)")
    p.add_argument("--skip-failed", action="store_true", help="do not retry cells that failed before")
    p.add_argument("--report", action="store_true", help="write OUTDIR/report/ when the grid ends")
    add_quiet(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..bench import build_report, run_grid
    from ..errors import UserError

    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    if args.address and args.executor != "ray":
        raise UserError("--address is for --executor ray")
    counts = run_grid(args.config, args.outdir, preset=args.preset, executor=args.executor, workers=args.workers,
                      address=args.address, progress=not args.quiet, retry_failed=not args.skip_failed,
                      datasets=args.dataset)
    print(f"{args.outdir}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if args.report:
        print(f"report: {build_report(args.outdir)}")
    return 1 if counts.get("failed") else 0
