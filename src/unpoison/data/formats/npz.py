"""NPZ with keys x_train, y_train, x_test, y_test, classes (the hand-over format of many tools)."""

from __future__ import annotations

import json
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ... import __version__
from ...errors import UserError, printable
from ...outputs import NPZ_MARKER
from .._format import FORMATS, DatasetFormat
from .._limits import check_alloc, check_compressed, human, npy_header, npy_nbytes
from ..dataset import ImageDataset

_KEYS = ("x_train", "y_train", "x_test", "y_test", "classes")


def _check_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> int:
    """Bytes the member's array will take, after checking its header against what the zip really holds."""
    name = printable(info.filename)
    if info.compress_type == zipfile.ZIP_STORED:
        if info.file_size != info.compress_size:
            raise UserError(f"{name}: stored member says {info.file_size} bytes but holds {info.compress_size}", path)
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        check_compressed(info.file_size, info.compress_size, name, path)
    else:  # numpy writes stored or deflated members; bzip2/lzma could inflate far beyond any ratio check
        raise UserError(f"{name}: unsupported zip compression method {info.compress_type}", path)
    with z.open(info) as f:
        shape, _, dtype = npy_header(f, f"{path}:{name}")
        head = f.tell()
    need = npy_nbytes(shape, dtype)
    if head + need != info.file_size:
        raise UserError(f"{name}: header says shape {shape} {dtype} ({human(need)}) but the member holds "
                        f"{human(max(info.file_size - head, 0))} of data", path)
    return need


def _read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> np.ndarray:
    with z.open(info) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


class NPZFormat(DatasetFormat):
    name = "npz"
    priority = 30
    writes_dir = False

    def detect(self, path: Path) -> bool:
        """``.npz`` suffix, or a zip file (NumPy's savez output) whatever its name."""
        if not path.is_file():
            return False
        if path.suffix.lower() == ".npz":
            return True
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04" and zipfile.is_zipfile(path)

    def read(self, path: Path, mmap: bool = False) -> ImageDataset:
        try:
            with zipfile.ZipFile(path) as z:
                members = {i.filename[:-4]: i for i in z.infolist() if i.filename.endswith(".npy")}
                if not {"x_train", "y_train"} <= set(members):
                    found = sorted(printable(k) for k in members)[:8]
                    raise UserError(f"NPZ needs arrays x_train and y_train, found {found}", path)
                keys = [k for k in _KEYS if k in members]
                # every claim is checked (header vs member size vs compressed size vs budget) before any
                # array is allocated: a few bytes may not claim 10**9 images
                total = sum(_check_member(z, members[k], path) for k in keys)
                check_alloc(total, "the arrays", path)
                arrays = {k: _read_member(z, members[k], path) for k in keys}
        except UserError:
            raise
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError,
                KeyError, struct.error, OverflowError) as e:
            raise UserError(f"corrupt or unreadable NPZ ({type(e).__name__}: {printable(e)})", path) from None
        x_tr, y_tr = arrays["x_train"], arrays["y_train"]
        x_te, y_te = arrays.get("x_test"), arrays.get("y_test")
        classes: list[str] = []
        if "classes" in arrays:
            names = arrays["classes"]
            if names.ndim != 1 or names.dtype.kind not in "USiu":
                raise UserError(f"classes must be a 1-D array of names, got {names.dtype} {names.shape}", path)
            classes = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names.tolist()]
        # Keras-style MNIST NPZs hold N x H x W grayscale: give them their channel axis
        x_tr = x_tr[..., None] if x_tr.ndim == 3 else x_tr
        x_te = x_te[..., None] if x_te is not None and x_te.ndim == 3 else x_te
        for name, y in (("y_train", y_tr), ("y_test", y_te)):
            if y is not None and (not np.issubdtype(y.dtype, np.integer) or y.ndim != 1):
                raise UserError(f"{name} must be a 1-D array of integers, got {y.dtype} {y.shape}", path)
        return ImageDataset(
            x_tr, y_tr.astype(np.int64), x_te, None if y_te is None else y_te.astype(np.int64),
            classes, source=str(path), format=self.name,
        )

    def write(self, ds: ImageDataset, path: Path) -> None:
        arrays = {"x_train": np.asarray(ds.x_train), "y_train": ds.y_train.astype(np.int64),
                  "classes": np.array(ds.classes, dtype=str),
                  # the marker that lets --overwrite recognise this file as ours (readers ignore it)
                  NPZ_MARKER: np.array(json.dumps({"written_by": "unpoison", "version": __version__}))}
        if ds.has_test:
            arrays["x_test"] = np.asarray(ds.x_test)
            arrays["y_test"] = ds.y_test.astype(np.int64)  # type: ignore[union-attr]
        with open(path, "wb") as f:
            np.savez(f, **arrays)


FORMATS.register("npz", "NPZ file with x_train/y_train/x_test/y_test/classes")(NPZFormat())
