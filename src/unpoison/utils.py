"""Small shared machinery: device choice, seeding, atomic writes, manifests, PSNR."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import random
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision

from . import __version__
from .data.rows import RowReader, file_backing, save_rows
from .errors import UserError, check_seed
from .outputs import Policy, atomic_path


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch process-wide; return a CPU generator for explicit sampling.

    For scripts only: library code uses local generators and :func:`unpoison.tensors.rng_scope`.
    A seed outside [0, 2**32 - 1] is a :class:`UserError` (torch overflows on 10**20, numpy refuses -1)."""
    seed = check_seed(seed, "seed")
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def versions() -> dict[str, str]:
    out = {
        "unpoison": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }
    with contextlib.suppress(Exception):
        out["torchvision"] = torchvision.__version__
    if torch.cuda.is_available():
        out["cuda_device"] = torch.cuda.get_device_name(0)
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (Path, torch.device)):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return repr(o)


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=_json_default, sort_keys=False)


def write_text_atomic(path: str | Path, text: str, policy: Policy = "internal") -> None:
    with atomic_path(path, policy=policy) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any, policy: Policy = "internal") -> None:
    write_text_atomic(path, to_json(obj) + "\n", policy)


def save_npy_atomic(path: str | Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        if arr.ndim and file_backing(arr) is not None:  # a memmap: copied from its file in chunks
            save_rows(arr, tmp)
            return
        with open(tmp, "wb") as f:
            np.save(f, arr)


def move_file_atomic(src: str | Path, final: str | Path) -> None:
    """Put a file of our own at ``final`` by a rename into the atomic write (a copy across file systems)."""
    with atomic_path(final) as tmp:
        try:
            os.replace(src, tmp)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            shutil.copyfile(src, tmp)
            os.unlink(src)


def manifest(command: str, config: dict[str, Any], seed: int, timings: dict[str, float],
             **extra: Any) -> dict[str, Any]:
    """The record every run writes: what ran, with which config, versions, seed and timings."""
    return {
        "command": command,
        "argv": sys.argv,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seed": seed,
        "config": config,
        "versions": versions(),
        "timings_s": timings,
        **extra,
    }


def psnr_from_mse(mse: float) -> float:
    """PSNR (dB) of a mean squared error on the [0, 1] scale; inf for identical images."""
    return float("inf") if mse == 0 else 10.0 * float(np.log10(1.0 / mse))


def psnr(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, chunk_bytes: int = 64 << 20) -> float:
    """PSNR in dB between two uint8 (0..255) or float (0..1) image batches, over the whole batch.

    The one PSNR: arrays larger than ``chunk_bytes`` (memory-mapped splits) are read in chunks of rows, in
    file order, so memory stays bounded; smaller ones in one pass."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or a.nbytes <= chunk_bytes:
        return psnr_from_mse(_sq_err(np.asarray(a) if not isinstance(a, torch.Tensor) else a,
                                     np.asarray(b) if not isinstance(b, torch.Tensor) else b).mean().item())
    step = max(1, chunk_bytes // max(1, int(a.nbytes // max(1, len(a)))))
    sse, count = 0.0, 0
    with RowReader(a) as ra, RowReader(b) as rb:
        for i in range(0, len(a), step):
            d = _sq_err(ra.read(i, i + step), rb.read(i, i + step))
            sse += d.sum().item()
            count += d.numel()
    return psnr_from_mse(sse / max(count, 1))


def _sq_err(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> torch.Tensor:
    a_t, b_t = (t if isinstance(t, torch.Tensor) else torch.as_tensor(t if t.flags.writeable else np.array(t))
                for t in (a, b))
    scale = 255.0 if a_t.dtype == torch.uint8 else 1.0
    return ((a_t.double() - b_t.double()) / scale).pow(2)


class Timer:
    """Collects named durations: ``with timer("train"): ...`` adds wall seconds under ``train`` and this
    process's CPU seconds (all its threads) under ``train_cpu``: on a shared machine the wall time moves with
    the load, the CPU time much less (a compute frontier compares CPU seconds)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
            cpu = f"{name}_cpu"
            self.times[cpu] = self.times.get(cpu, 0.0) + time.process_time() - c0


def parse_fraction(text: str | float, what: str = "value") -> float:
    """Parse ``8/255``, ``0.03`` or ``1`` to a float; bad text is a :class:`UserError`."""
    if isinstance(text, (int, float)):
        return float(text)
    s = str(text).strip()
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return float(num) / float(den)
        return float(s)
    except (ValueError, ZeroDivisionError):
        raise UserError(f"bad {what} {text!r}: expected a number or a fraction like 8/255") from None
