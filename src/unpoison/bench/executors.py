"""Where cells run: ``local`` (this process, or N worker processes) or ``ray`` (one Ray task per cell).

Workers only compute and return records; the driver writes the store (SQLite, one writer). A cell
is marked ``running`` before it is handed out, so a killed grid leaves its unfinished cells as
``running`` and the next run resumes them. A worker process that dies (out of memory, killed)
fails only its own cell; the grid goes on.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .._registry import Registry
from ..errors import UserError
from .grid import Cell
from .run import run_cell
from .store import Store

Executor = Callable[..., dict[str, int]]
EXECUTORS: Registry[Executor] = Registry("executor")


class _Progress:
    """One bar over the grid's cells with the numbers a user watches (done, failed, last accuracy)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, desc="cells", disable=not enabled, dynamic_ncols=True)
        self.counts = {"done": 0, "failed": 0}

    def update(self, cell: Cell, rec: dict[str, Any]) -> None:
        self.counts[rec["status"]] = self.counts.get(rec["status"], 0) + 1
        acc = (rec.get("results") or {}).get("final_acc")
        self.bar.set_postfix(done=self.counts["done"], failed=self.counts["failed"],
                             last=f"{cell.key[-48:]}" + (f" {acc:.1f}%" if isinstance(acc, float) else ""))
        self.bar.update(1)
        if rec["status"] == "failed":
            first = (rec.get("error") or "").splitlines()[:1]
            tqdm.write(f"cell failed: {cell.key}: {first[0] if first else ''}")

    def close(self) -> None:
        self.bar.close()


def _died(cell: Cell, why: str) -> dict[str, Any]:
    return {"status": "failed", "results": {}, "timings": {}, "manifest": {}, "error": why}


@EXECUTORS.register("local", "this machine: in this process (workers=1) or N worker processes")
def run_local(store: Store, cells: list[Cell], outdir: Path, workers: int = 1, progress: bool = True,
              **_: Any) -> dict[str, int]:
    bar = _Progress(len(cells), progress)
    try:
        if workers <= 1:
            for cell in cells:
                store.mark_running(cell.key)
                rec = run_cell(cell, outdir, progress=progress)
                store.record(cell.key, rec)
                bar.update(cell, rec)
            return bar.counts
        threads = max(1, (os.cpu_count() or 1) // workers)
        queue = list(cells)
        while queue:
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"))
            running: dict[Future, Cell] = {}
            broken = False
            try:
                while (queue or running) and not broken:
                    while queue and len(running) < workers:
                        cell = queue.pop(0)
                        store.mark_running(cell.key)
                        running[pool.submit(run_cell, cell, str(outdir), False, threads)] = cell
                    done, _ = wait(list(running), return_when=FIRST_COMPLETED)
                    for fut in done:
                        cell = running.pop(fut)
                        try:
                            rec = fut.result()
                        except BrokenProcessPool:
                            rec, broken = _died(cell, "worker process died (killed or out of memory)"), True
                        store.record(cell.key, rec)
                        bar.update(cell, rec)
                if broken:  # the pool is unusable: its other cells go back in the queue
                    queue = list(running.values()) + queue
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        return bar.counts
    finally:
        bar.close()


@EXECUTORS.register("ray", "Ray: each cell a task with its CPU/GPU request, on a local instance or --address")
def run_ray(store: Store, cells: list[Cell], outdir: Path, workers: int = 1, progress: bool = True,
            address: str | None = None, ray_init: dict[str, Any] | None = None, **_: Any) -> dict[str, int]:
    try:
        import ray
    except ImportError:
        raise UserError("the ray executor needs Ray: pip install 'unpoison[ray]'") from None
    started_here = False
    if not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, **(ray_init or {})}
        if address:
            kw["address"] = address
        elif workers > 1:
            kw.setdefault("num_cpus", workers)
        try:
            ray.init(**kw)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"cannot start/connect Ray ({address or 'local'}): {str(e).splitlines()[0]}") from None
        started_here = True
    remote = ray.remote(run_cell)
    bar = _Progress(len(cells), progress)
    refs: dict[Any, Cell] = {}
    # a request the (fixed, local) cluster can never meet would wait forever: fail that cell instead
    total = {} if address else ray.cluster_resources()
    try:
        for cell in cells:
            res = cell.config.get("resources") or {}
            opts = {"num_cpus": float(res.get("num_cpus", 1)), "num_gpus": float(res.get("num_gpus", 0)),
                    "max_retries": 0}
            short = [f"{opts[k]:g} {r}" for k, r in (("num_cpus", "CPU"), ("num_gpus", "GPU"))
                     if total and opts[k] > total.get(r, 0.0)]
            if short:
                rec = _died(cell, f"cell asks for {' and '.join(short)} but the Ray cluster has "
                                  f"{total.get('CPU', 0):g} CPU, {total.get('GPU', 0):g} GPU (see 'resources:')")
                store.record(cell.key, rec)
                bar.update(cell, rec)
                continue
            store.mark_running(cell.key)
            threads = int(res.get("num_cpus", 1)) or 1
            refs[remote.options(**opts).remote(cell, str(Path(outdir).resolve()), False, threads)] = cell
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                cell = refs.pop(ref)
                try:
                    rec = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a lost worker fails its own cell only
                    rec = _died(cell, f"ray task failed: {type(e).__name__}: {str(e).splitlines()[0]}")
                store.record(cell.key, rec)
                bar.update(cell, rec)
        return bar.counts
    finally:
        bar.close()
        if started_here:
            ray.shutdown()
