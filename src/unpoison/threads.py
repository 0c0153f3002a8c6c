"""How many intra-op threads torch may use: the cores actually free, never more.

OpenMP threads that share a core with other busy processes do not slow down gracefully: a D-VAE
purification with 2 threads on 2 cores that two one-thread jobs were using took 688 s instead of about
100 s (each thread waits at every barrier for the one that lost its core). So a command starts with as many
threads as there are idle cores in its affinity set (at least one), unless the user chose: ``--threads N``
first, then ``OMP_NUM_THREADS``.

Busy cores are read twice, both system-wide and scaled to the share of the machine this process may run on:
the 1-minute load average (jobs that have been running a while) and the number of runnable tasks right now
(``procs_running`` in ``/proc/stat``, less this process; jobs that just started). The larger one counts:
one thread too few costs at most its share, one too many can cost a factor of several.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch

from .errors import UserError


def affinity_cores() -> int:
    """Cores this process may run on (its affinity set; ``os.cpu_count()`` where there is none)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def running_now(stat: str = "/proc/stat") -> int | None:
    """Runnable tasks on the machine right now, this one included (None where the kernel does not say)."""
    try:
        with open(stat) as f:
            for line in f:
                if line.startswith("procs_running "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def load_1min() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def free_threads(cores: int, machine_cores: int, load: float | None, running: int | None) -> int:
    """The rule, with its inputs given: ``cores`` in our affinity set out of ``machine_cores``, the 1-minute
    ``load`` average and the ``running`` tasks (ours included), both system-wide. Busy cores in our set are
    the larger reading times our share of the machine, rounded to the nearest core; the rest are free, at
    least one."""
    others = max(load or 0.0, float(max(0, (running or 0) - 1)))
    busy = others * cores / max(machine_cores, cores)
    return max(1, cores - math.floor(busy + 0.5))


def env_threads(env: Mapping[str, str]) -> int | None:
    """``OMP_NUM_THREADS`` when it names a positive count (OpenMP's own syntax ``4,2`` reads as 4)."""
    raw = env.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    try:
        n = int(raw)
    except ValueError:
        return None
    return n if n >= 1 else None


def pick_threads(requested: int | None = None, env: Mapping[str, str] | None = None) -> int:
    """The intra-op thread count: ``requested`` (``--threads``), else ``OMP_NUM_THREADS``, else the free
    cores of this process's affinity set (:func:`free_threads` on the live readings)."""
    if requested is not None:
        if requested < 1:
            raise UserError(f"--threads must be >= 1, got {requested}")
        return int(requested)
    n = env_threads(os.environ if env is None else env)
    if n is not None:
        return n
    return free_threads(affinity_cores(), max(1, os.cpu_count() or 1), load_1min(), running_now())


def apply_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads by :func:`pick_threads` and return the count (at a command's start)."""
    n = pick_threads(requested)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
