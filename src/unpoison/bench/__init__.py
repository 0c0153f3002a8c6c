"""The benchmark: configs -> grid of cells -> results store -> the paper's tables and figures.

``run_grid("table2", "out/", preset="smoke")`` runs (or resumes) a grid; ``build_report("out/")``
writes ``out/report/``. The CLI commands ``unpoison bench`` and ``unpoison report`` wrap these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .grid import Cell, expand, fingerprint, load_config, shipped_configs, validate
from .store import Store


def run_grid(config: str | Path, outdir: str | Path, preset: str | None = None, executor: str = "local",
             workers: int = 1, address: str | None = None, progress: bool = True, retry_failed: bool = True,
             datasets: list[str] | None = None, **executor_kw: Any) -> dict[str, int]:
    """Run every unfinished cell of ``config`` (with ``preset``) into ``outdir``; return status counts.

    Bad names, an OUTDIR holding another grid or an incompatible store raise :class:`UserError`
    before anything is written.
    """
    from .executors import EXECUTORS
    from .grid import import_plugins

    exe = EXECUTORS.get(executor)
    cfg = load_config(config, preset, datasets)
    import_plugins(cfg.get("plugins") or [])
    cells = expand(cfg)
    validate(cells, cfg.get("_source"))
    store = Store.create_or_open(outdir, fingerprint(cells), cells, cfg)
    try:
        todo = store.todo(retry_failed)
        if todo:
            exe(store, todo, Path(outdir), workers=workers, progress=progress, address=address, **executor_kw)
        return store.status_counts()
    finally:
        store.close()


def build_report(outdir: str | Path) -> Path:
    from .report import build_report as _build

    return _build(outdir)


__all__ = ["run_grid", "build_report", "load_config", "expand", "fingerprint", "validate", "Cell", "Store",
           "shipped_configs"]
