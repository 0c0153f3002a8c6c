"""SVHN cropped digits: ``train_32x32.mat`` / ``test_32x32.mat`` (keys X: 32x32x3xN, y: Nx1, 10 means 0).

MAT files are read with ``scipy.io.loadmat`` (a data parser, no pickle) from memory, after a walk
over the file's elements checks every size they claim (scipy would allocate what a tag claims
before reading it) and inflates compressed variables with a cap. ``extra_32x32.mat`` is not read
(it is not part of the usual protocol).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import scipy.io

from ...errors import UserError
from .._format import FORMATS, DatasetFormat
from .._limits import check_alloc, human, memory_budget
from ..dataset import ImageDataset

TRAIN, TEST = "train_32x32.mat", "test_32x32.mat"


_MI_MATRIX, _MI_COMPRESSED = 14, 15


def _inflate(data: bytes, cap: int, path: Path) -> bytes:
    """Decompress one zlib element in 1 MiB steps, refusing past ``cap`` (never inflated whole first)."""
    d = zlib.decompressobj()
    out = bytearray()
    buf = data
    while True:
        chunk = d.decompress(buf, 1 << 20)
        out += chunk
        if len(out) > cap:
            raise UserError(f"a compressed variable inflates past {human(cap)} (the memory budget)", path)
        buf = d.unconsumed_tail
        if d.eof or (not chunk and not buf):
            break
    if not d.eof:
        raise UserError("truncated compressed variable", path)
    return bytes(out)


def _walk(buf: bytes, start: int, end: int, order: str, depth: int, budget: list[int], path: Path) -> None:
    """Check every element's byte count against the bytes really there, recursing into matrices.

    scipy allocates a buffer of the size an element's tag claims before reading it; here no claim may
    exceed its parent's remaining bytes, and compressed variables are inflated (capped) and checked too.
    """
    if depth > 16:
        raise UserError("variables nested too deeply", path)
    pos = start
    while pos < end:
        if end - pos < 8:
            if not any(buf[pos:end]):
                return
            raise UserError("truncated element tag", path)
        typ, n = struct.unpack_from(order + "II", buf, pos)
        if typ >> 16:  # small data element: type and size in the first 4 bytes, data in the next 4
            if typ >> 16 > 4:
                raise UserError("corrupt small data element", path)
            pos += 8
            continue
        pos += 8
        if n > end - pos:
            raise UserError(f"an element claims {human(n)} but only {human(end - pos)} follow", path)
        if typ == _MI_MATRIX:
            _walk(buf, pos, pos + n, order, depth + 1, budget, path)
        elif typ == _MI_COMPRESSED:
            if depth:
                raise UserError("compressed element inside a variable", path)
            inner = _inflate(buf[pos:pos + n], budget[0], path)
            budget[0] -= len(inner)
            _walk(inner, 0, len(inner), order, depth + 1, budget, path)
        pos += n
        if depth:
            pos = start + (pos - start + 7) // 8 * 8


def _check_mat(raw: bytes, path: Path) -> None:
    """A MAT v5 file whose every size claim fits the file (and, inflated, the budget); v7.3/v4 refused."""
    if b"MATLAB 7.3" in raw[:128] or raw[512:520] == b"\x89HDF\r\n\x1a\n":
        raise UserError("MATLAB v7.3 (HDF5) .mat files are not supported; save with -v7", path)
    if len(raw) < 128 or raw[126:128] not in (b"IM", b"MI"):
        raise UserError("not a MATLAB v5 .mat file (SVHN's files are v5)", path)
    order = "<" if raw[126:128] == b"IM" else ">"
    _walk(raw, 128, len(raw), order, 0, [max(memory_budget() - len(raw), 0)], path)


def _read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        size = path.stat().st_size
        check_alloc(size, "the .mat file", path)
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read .mat file ({e.strerror or e})", path) from None
    _check_mat(raw, path)
    try:
        m = scipy.io.loadmat(io.BytesIO(raw), variable_names=["X", "y"])
    except NotImplementedError:
        raise UserError("MATLAB v7.3 (HDF5) .mat files are not supported; save with -v7", path) from None
    except Exception as e:  # scipy raises ValueError, TypeError, OSError, MatReadError... on bad files
        raise UserError(f"corrupt or unreadable .mat file ({type(e).__name__}: {e})", path) from None
    if "X" not in m or "y" not in m:
        raise UserError(f"expected variables X and y, found {sorted(k for k in m if not k.startswith('__'))}", path)
    x, y = m["X"], m["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3:
        raise UserError(f"X must be uint8 H x W x 3 x N, got {x.dtype} {x.shape}", path)
    y = np.asarray(y).reshape(-1)
    if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and np.all(y == np.rint(y)))):
        raise UserError(f"y must hold integer labels, got {y.dtype}", path)
    y = y.astype(np.int64)
    if len(y) != x.shape[3]:
        raise UserError(f"X has {x.shape[3]} images but y has {len(y)} labels", path)
    if len(y) and (y.min() < 0 or y.max() > 10):
        raise UserError(f"labels out of range [{y.min()}, {y.max()}]; SVHN labels are 1..10 (10 means 0)", path)
    return np.ascontiguousarray(x.transpose(3, 0, 1, 2)), np.where(y == 10, 0, y)


def _root(path: Path) -> Path:
    return path.parent if path.is_file() else path


class SVHNFormat(DatasetFormat):
    name = "svhn"
    priority = 12

    def detect(self, path: Path) -> bool:
        return (_root(path) / TRAIN).is_file()

    def read(self, path: Path, mmap: bool = False) -> ImageDataset:
        root = _root(path)
        if not (root / TRAIN).is_file():
            raise UserError(f"missing {TRAIN}", root)
        x_tr, y_tr = _read_mat(root / TRAIN)
        x_te = y_te = None
        if (root / TEST).is_file():
            x_te, y_te = _read_mat(root / TEST)
        return ImageDataset(x_tr, y_tr, x_te, y_te, [str(i) for i in range(10)], source=str(root), format=self.name)

    def write(self, ds: ImageDataset, path: Path) -> None:
        if ds.image_shape[2] != 3 or ds.num_classes > 10:
            raise UserError(f"SVHN's format holds RGB images of at most 10 classes, not {ds.image_shape} with "
                            f"{ds.num_classes} classes; choose --format npz or imagefolder", path)
        path.mkdir(parents=True, exist_ok=True)
        for name, x, y in ((TRAIN, ds.x_train, ds.y_train), (TEST, ds.x_test, ds.y_test)):
            if x is None or y is None:
                continue
            lab = np.where(y == 0, 10, y).astype(np.uint8)[:, None]
            scipy.io.savemat(str(path / name), {"X": np.asarray(x).transpose(1, 2, 3, 0), "y": lab},
                             do_compression=False)


FORMATS.register("svhn", "SVHN train_32x32.mat/test_32x32.mat (scipy.io, label 10 = digit 0)")(SVHNFormat())
