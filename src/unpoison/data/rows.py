"""Rows of ``.npy`` files read and written with ``pread``/``pwrite``, never through a memory map.

Streaming a dataset larger than RAM needs three things a memory map does not give:

* **bounded resident memory**: pages touched through a map count in the process's RSS until the
  kernel reclaims them, so reading a 3 GB memmap once shows a 3 GB process; ``pread`` copies only
  the rows asked for (the page cache keeps the rest, outside the process);
* **errors, not signals**: a write through a map onto a full disk is a ``SIGBUS`` that kills the
  process; ``pwrite`` returns ``ENOSPC``, which the output contract turns into one line. Writers
  also reserve the whole file up front (``posix_fallocate``), so a full disk fails before hours of
  work, not after;
* **several writers**: processes of a data-parallel job ``pwrite`` disjoint row slices of one file.

:class:`RowReader` reads row ranges and gathers rows by index (in sorted order, runs coalesced into
one ``preadv``) from a C-contiguous view of a file-backed ``np.memmap`` such as ``npy`` folders give;
any other array is indexed in memory. :class:`NpyWriter` creates or opens a ``.npy`` of a fixed
shape and writes row slices.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np

from ._limits import npy_header, npy_nbytes

#: rows per ``preadv`` call stay under the usual IOV_MAX (1024)
_IOV = 1024
#: bytes per chunk of a streamed copy
COPY_CHUNK = 16 << 20


def file_backing(x: np.ndarray) -> tuple[str, int] | None:
    """``(file, byte offset of x[0])`` when ``x`` is a C-contiguous view of a file ``np.memmap``; else None."""
    if not isinstance(x, np.ndarray) or not x.flags.c_contiguous or x.ndim < 1:
        return None
    root: np.ndarray = x
    while isinstance(root.base, np.ndarray):
        root = root.base
    if not isinstance(root, np.memmap) or not isinstance(root.base, mmap.mmap) or not root.filename:
        return None
    return str(root.filename), int(root.offset) + (x.ctypes.data - root.ctypes.data)


def _preadv_full(fd: int, views: list[memoryview], offset: int) -> None:
    """Fill ``views`` from ``offset`` on: one ``preadv``, then row by row for what a short read left."""
    want = sum(v.nbytes for v in views)
    got = os.preadv(fd, views, offset)
    if got == want:
        return
    for v in views:  # a short read (signal, network file system): finish it the plain way
        n = v.nbytes
        if got >= n:
            got -= n
            offset += n
            continue
        pos = got
        while pos < n:
            k = os.preadv(fd, [v[pos:]], offset + pos)
            if k == 0:
                raise OSError(errno.EIO, "unexpected end of file (the file shrank while it was read)")
            pos += k
        got = 0
        offset += n


class _FdHandle:
    """An owned file descriptor closed by :meth:`close`, ``with`` or (best effort) garbage collection."""

    fd: int | None = None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class RowReader(_FdHandle):
    """Rows of ``x`` (first axis) read on demand: from its file when ``x`` is a memmap, else from memory.

    Thread-safe (``pread`` has no shared file position); close it, or use it as a context manager.
    """

    def __init__(self, x: np.ndarray) -> None:
        self.x = x
        self.row_shape = tuple(x.shape[1:])
        self.dtype = x.dtype
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * x.dtype.itemsize
        self.fd: int | None = None
        backing = file_backing(x)
        if backing is not None and self.row_bytes > 0:
            path, self.offset = backing
            self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            if os.fstat(self.fd).st_size < self.offset + len(x) * self.row_bytes:
                os.close(self.fd)
                raise OSError(errno.EIO, "file is shorter than the array mapped from it (changed on disk?)", path)

    @property
    def from_file(self) -> bool:
        return self.fd is not None

    def __len__(self) -> int:
        return len(self.x)

    def _empty(self, n: int, out: np.ndarray | None) -> np.ndarray:
        if out is None:
            return np.empty((n, *self.row_shape), dtype=self.dtype)
        if out.shape != (n, *self.row_shape) or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {self.dtype} array of shape {(n, *self.row_shape)}")
        return out

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start:stop`` as a new (or the given) C-contiguous array."""
        start, stop = max(0, start), min(len(self.x), stop)
        buf = self._empty(max(0, stop - start), out)
        if stop <= start:
            return buf
        if self.fd is None:
            buf[...] = self.x[start:stop]
        else:
            flat = memoryview(buf.reshape(-1).view(np.uint8))
            _preadv_full(self.fd, [flat], self.offset + start * self.row_bytes)
        return buf

    def gather(self, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``idx`` in the order given (duplicates allowed), read in ascending file order.

        Runs of consecutive indices become one ``preadv`` whose buffers are the destination rows, so
        a shuffled batch costs one read per run and no extra copy.
        """
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        buf = self._empty(len(idx), out)
        if len(idx) == 0:
            return buf
        if idx.min() < 0 or idx.max() >= len(self.x):
            raise IndexError(f"row index out of range [0, {len(self.x)})")
        if self.fd is None:
            np.take(self.x, idx, axis=0, out=buf)
            return buf
        order = np.argsort(idx, kind="stable")
        s = idx[order]
        rows = buf.reshape(len(idx), -1).view(np.uint8)
        breaks = np.flatnonzero(np.diff(s) != 1) + 1
        starts = np.concatenate(([0], breaks))
        ends = np.concatenate((breaks, [len(s)]))
        for a, b in zip(starts.tolist(), ends.tolist()):
            for c in range(a, b, _IOV):
                d = min(b, c + _IOV)
                views = [memoryview(rows[j]) for j in order[c:d].tolist()]
                _preadv_full(self.fd, views, self.offset + int(s[c]) * self.row_bytes)
        return buf

    def __del__(self) -> None:  # pragma: no cover - best effort when a caller forgot close()
        with contextlib.suppress(OSError):
            self.close()


def _write_header(f: object, shape: tuple[int, ...], dtype: np.dtype) -> None:
    d = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    try:
        np.lib.format.write_array_header_1_0(f, d)
    except ValueError:  # header longer than 64 KiB: format 2.0
        np.lib.format.write_array_header_2_0(f, d)


def _reserve(fd: int, offset: int, length: int) -> None:
    """Allocate the data's blocks now: a full disk fails here, in seconds, not at the last row."""
    if length <= 0:
        return
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, offset + length)  # this file system cannot reserve: a sparse file it is
    except AttributeError:  # pragma: no cover - no posix_fallocate (macOS)
        os.ftruncate(fd, offset + length)


class NpyWriter(_FdHandle):
    """A ``.npy`` file of fixed ``shape`` and ``dtype`` whose rows are written with ``pwrite``.

    :meth:`create` writes the header and reserves the data (``ENOSPC``/``EFBIG`` raise here);
    :meth:`open` lets another process of the same job write its own rows. Rows never written read
    as zeros. ``flush`` makes the written rows durable (``fsync``).
    """

    def __init__(self, path: str | Path, fd: int, shape: tuple[int, ...], dtype: np.dtype, offset: int) -> None:
        self.path = Path(path)
        self.fd: int | None = fd
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.offset = offset
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    @classmethod
    def create(cls, path: str | Path, shape: tuple[int, ...], dtype: np.dtype | type | str) -> NpyWriter:
        dt = np.dtype(dtype)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            with os.fdopen(os.dup(fd), "wb", closefd=True) as f:
                _write_header(f, shape, dt)
                offset = f.tell()
            _reserve(fd, offset, npy_nbytes(shape, dt))
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, shape, dt, offset)

    @classmethod
    def open(cls, path: str | Path) -> NpyWriter:
        """An existing ``.npy`` (made by :meth:`create`) opened to write rows into it."""
        fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        try:
            with os.fdopen(os.dup(fd), "rb", closefd=True) as f:
                shape, fortran, dtype = npy_header(f, path)
                offset = f.tell()
            if fortran:
                raise ValueError(f"{path}: a Fortran-ordered .npy cannot be written by rows")
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, shape, dtype, offset)

    def write(self, start: int, rows: np.ndarray) -> None:
        """Write ``rows`` (C-contiguous, this file's dtype and row shape) as rows ``start:start+len(rows)``."""
        if self.fd is None:
            raise ValueError("write to a closed NpyWriter")
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if tuple(rows.shape[1:]) != self.row_shape or start < 0 or start + len(rows) > self.shape[0]:
            raise ValueError(f"rows {rows.shape} at {start} do not fit {self.shape}")
        view = memoryview(rows.reshape(-1).view(np.uint8))
        pos, off = 0, self.offset + start * self.row_bytes
        while pos < len(view):
            pos += os.pwrite(self.fd, view[pos:], off + pos)

    def flush(self) -> None:
        if self.fd is not None:
            os.fsync(self.fd)


def save_rows(x: np.ndarray, path: str | Path, chunk_bytes: int = COPY_CHUNK) -> None:
    """Write ``x`` as a new ``.npy`` at ``path`` in chunks (bounded memory; a memmap is read from its file)."""
    with RowReader(x) as r, NpyWriter.create(path, x.shape, x.dtype) as w:
        step = max(1, chunk_bytes // max(1, r.row_bytes))
        buf: np.ndarray | None = None
        for i in range(0, len(x), step):
            j = min(len(x), i + step)
            if buf is None or len(buf) != j - i:
                buf = np.empty((j - i, *r.row_shape), dtype=x.dtype)
            w.write(i, r.read(i, j, out=buf))
