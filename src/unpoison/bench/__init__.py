"""The benchmark: configs -> grid of cells -> results store -> the paper's tables and figures.

``run_grid("table2", "out/", preset="smoke")`` runs (or resumes) a grid; ``check_config("table2", "cpu")``
validates one without running it; ``build_report("out/")`` writes ``out/report/``. The CLI commands
``unpoison bench`` and ``unpoison report`` wrap these.

Modules, lowest first (each imports only modules above it): ``grid`` (configs -> cells), ``store`` (SQLite),
``paper`` (the paper's numbers), ``table`` (the number formatter, the Table, pivots), ``tables`` (the kinds'
tables), ``figures``, ``sections`` and ``report_scan`` (each kind's report section), ``cell`` (a cell's context
and the builders it shares with the check), ``kinds`` (the kind registry and experiment functions), ``run`` (one
cell), ``executors`` (where cells run), ``check`` (every cell, before a run), ``report`` (the report page).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..errors import UserError
from .check import check_grid
from .executors import EXECUTORS
from .grid import Cell, expand, fingerprint, import_plugins, load_config, require_plugins_allowed, shipped_configs
from .report import build_report
from .store import Store


@dataclass
class CheckedGrid:
    """A config expanded and checked: its cells (with data digests) and every problem found."""

    config: dict[str, Any]
    cells: list[Cell]
    problems: list[str] = field(default_factory=list)


def check_config(config: str | Path, preset: str | None = None, datasets: list[str] | None = None,
                 allow_plugins: bool = False) -> CheckedGrid:
    """Load, expand and check a grid (see :mod:`unpoison.bench.check`) without running a cell.

    Config-level errors (no such config, bad YAML, unknown keys, plugins without ``allow_plugins``) raise
    :class:`UserError`; per-cell problems are returned in ``problems``."""
    cfg = load_config(config, preset, datasets)
    require_plugins_allowed(cfg, allow_plugins)
    import_plugins(cfg.get("plugins") or [])
    cells = expand(cfg)
    return CheckedGrid(cfg, cells, check_grid(cells, cfg))


def run_grid(config: str | Path, outdir: str | Path, preset: str | None = None, executor: str = "local",
             workers: int = 1, address: str | None = None, progress: bool = True, retry_failed: bool = True,
             datasets: list[str] | None = None, allow_plugins: bool = False, extend: bool = False,
             **executor_kw: Any) -> dict[str, int]:
    """Run every unfinished cell of ``config`` (with ``preset``) into ``outdir``; return status counts.

    The whole grid is checked first: bad names, parameters, files or datasets, an OUTDIR holding another
    grid or an incompatible store raise :class:`UserError` before anything is written (``extend``: an earlier
    version of this grid, same name and preset, grows instead and keeps its finished cells). Cells finished on
    other data (the content behind a dataset spec changed) run again. Cells a grid ``needs`` first (AVATAR's
    diffusion model) run before their dependents; a dependent of a failed one fails without running.
    """
    exe = EXECUTORS.get(executor)
    grid = check_config(config, preset, datasets, allow_plugins)
    if grid.problems:
        more = f" (and {len(grid.problems) - 1} more; 'unpoison bench CONFIG --check' lists them)" \
            if len(grid.problems) > 1 else ""
        raise UserError(f"{grid.problems[0]}{more}", grid.config.get("_source"))
    cells = grid.cells
    store = Store.create_or_open(outdir, fingerprint(cells), cells, grid.config, extend=extend)
    try:
        todo, stale = store.todo(cells, retry_failed)
        if stale and progress:
            tqdm.write(f"{len(stale)} finished cell(s) ran on data that has changed since; running them again")
        for level in _levels(todo):
            ready = []
            for cell in level:
                needs = cell.config.get("needs") or []
                bad = [k for k, st in store.status_of(needs).items() if st != "done"]
                if bad:
                    store.mark_running(cell.key)
                    store.record(cell.key, {"status": "failed", "error": f"dependency did not finish: {bad[0]}",
                                            "data_digest": cell.data})
                else:
                    ready.append(cell)
            if ready:
                exe(store, ready, Path(outdir), workers=workers, progress=progress, address=address, **executor_kw)
        return store.status_counts()
    finally:
        store.close()


def _levels(cells: list[Cell]) -> list[list[Cell]]:
    """Cells grouped so that every cell comes after the cells it ``needs`` (which may be finished already)."""
    keys = {c.key for c in cells}
    done: set[str] = set()
    left = list(cells)
    out: list[list[Cell]] = []
    while left:
        level = [c for c in left if all(k in done or k not in keys for k in c.config.get("needs") or [])]
        if not level:  # a cycle cannot come out of expand(); run the rest rather than hang
            level = left
        out.append(level)
        done |= {c.key for c in level}
        left = [c for c in left if c.key not in done]
    return out


__all__ = ["run_grid", "check_config", "build_report", "load_config", "expand", "fingerprint", "Cell", "Store",
           "shipped_configs", "CheckedGrid"]
