"""Size checks before allocation: what a file's header claims is checked against the file and a budget.

A file of a few bytes can claim 10^9 images (an NPY/NPZ header, an IDX header, a PNG's size, a
pickled array's shape), and a compressed stream can inflate a thousandfold. Readers here ask
before they allocate: the claim must fit the bytes that are really there (a compressed stream
cannot exceed :data:`MAX_RATIO` times its size) and the memory budget (physical RAM, or
``UNPOISON_MAX_MEMORY`` such as ``4G``). Decompression is streamed with a cap, never read whole.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import IO

import numpy as np

from ..errors import UserError

#: deflate (gzip, zip, PNG, MAT v7) cannot expand more than ~1032:1; anything claiming more is lying
MAX_RATIO = 1100
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_CHUNK = 1 << 22


def human(n: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes from ``2G``, ``512M``, ``1.5GiB``, ``300k`` or a plain number (binary units); else a UserError."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise UserError(f"bad {what} {text}; expected bytes >= 0")
        return text
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", str(text).strip().lower())
    if not m:
        raise UserError(f"bad {what} {str(text)!r}; expected bytes such as 512M or 8G")
    return int(float(m[1]) * _UNITS[m[2]])


def memory_budget() -> int:
    """Bytes one dataset may take in memory: ``$UNPOISON_MAX_MEMORY`` (``512M``, ``8G``) or physical RAM."""
    env = os.environ.get("UNPOISON_MAX_MEMORY", "").strip().lower()
    if env:
        return parse_size(env, "UNPOISON_MAX_MEMORY")
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 16 << 30


def check_alloc(nbytes: int, what: str, path: str | Path) -> None:
    """Refuse (one line) before allocating ``nbytes`` for ``what`` when it exceeds the memory budget."""
    budget = memory_budget()
    if nbytes > budget:
        raise UserError(f"{what} would take {human(nbytes)}, more than the memory budget {human(budget)} "
                        "(set UNPOISON_MAX_MEMORY to raise it)", path)


def check_compressed(claimed: int, compressed: int, what: str, path: str | Path) -> None:
    """A compressed stream of ``compressed`` bytes cannot honestly hold more than ``MAX_RATIO`` times that."""
    if claimed > MAX_RATIO * max(compressed, 1) + 4096:
        raise UserError(f"{what} claims {human(claimed)} from {human(compressed)} of compressed data, more than "
                        f"deflate can hold ({MAX_RATIO}:1); refusing a corrupt or malicious file", path)


def read_exact(f: IO[bytes], n: int, path: str | Path, what: str) -> bytearray:
    """Exactly ``n`` bytes from ``f`` read in chunks into one buffer (allocated once, already checked)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = f.readinto(view[got:got + _CHUNK])  # type: ignore[attr-defined]
        if not k:
            raise UserError(f"truncated {what}: {got} of {n} bytes", path)
        got += k
    return buf


def npy_header(f: IO[bytes], path: str | Path) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an NPY stream, read up to its data (nothing of the data is read)."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:
            shape, fortran, dtype = fmt._read_array_header(f, version)  # 3.0: utf-8 header
    except (ValueError, OSError, EOFError, SyntaxError, TypeError, KeyError, RecursionError) as e:
        raise UserError(f"not a valid .npy header ({type(e).__name__}: {e})", path) from None
    if dtype.hasobject:
        raise UserError("holds Python objects (would need pickle); refusing it", path)
    if any(int(d) < 0 for d in shape):
        raise UserError(f"not a valid .npy header (negative dimension in {shape})", path)
    return tuple(int(d) for d in shape), bool(fortran), dtype


def npy_nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * dtype.itemsize


def check_npy_file(path: Path, mmap: bool = False) -> tuple[tuple[int, ...], np.dtype]:
    """Check a ``.npy`` file's header against its size (and, unless it is memory-mapped, the budget).

    A memory-mapped array may be larger than RAM (that is what the ``npy`` format is for): it is paged
    in as used, so only the claim against the file's real size is checked."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            shape, _, dtype = npy_header(f, path)
            data_start = f.tell()
    except OSError as e:
        raise UserError(f"cannot read .npy ({e.strerror or e})", path) from None
    need = npy_nbytes(shape, dtype)
    if size - data_start != need:
        raise UserError(f"header says shape {shape} {dtype} ({human(need)}) but the file holds "
                        f"{human(max(size - data_start, 0))} of data", path)
    if not mmap:
        check_alloc(need, f"array {shape} {dtype}", path)
    return shape, dtype
