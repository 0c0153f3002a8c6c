"""A folder of ``.npy`` files, memory-mappable, for datasets larger than RAM.

``x_train.npy`` (uint8 N x H x W x C), ``y_train.npy``, optional ``x_test.npy``/``y_test.npy``, and
``classes.json`` (a list of names). ``read(path, mmap=True)`` maps the images read-only
(``np.load(mmap_mode="r", allow_pickle=False)``) so they are paged in as used, never loaded whole;
the writer copies in chunks with ``pwrite`` (:mod:`unpoison.data.rows`), so a memory-mapped dataset is
written without loading or mapping it, and a full disk is an error (one line), never a ``SIGBUS``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ...errors import UserError
from .._format import FORMATS, DatasetFormat
from .._limits import check_npy_file
from ..dataset import ImageDataset
from ..rows import save_rows

_MAX_JSON = 16 << 20


def _load(path: Path, mmap: bool) -> np.ndarray:
    check_npy_file(path, mmap)  # header vs file size (vs memory budget), before numpy allocates what it claims
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as e:  # object arrays (would need pickle), bad header
        raise UserError(f"cannot read .npy ({e})", path) from None
    except (OSError, EOFError) as e:
        raise UserError(f"corrupt or truncated .npy ({e})", path) from None


def _labels(path: Path) -> np.ndarray:
    y = _load(path, mmap=False)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"labels must be a 1-D integer array, got {y.dtype} {y.shape}", path)
    return y.astype(np.int64)


class NPYFormat(DatasetFormat):
    name = "npy"
    priority = 20

    def detect(self, path: Path) -> bool:
        return path.is_dir() and (path / "x_train.npy").is_file() and (path / "y_train.npy").is_file()

    def read(self, path: Path, mmap: bool = False) -> ImageDataset:
        for f in ("x_train.npy", "y_train.npy"):
            if not (path / f).is_file():
                raise UserError(f"missing {f}", path)
        x_tr, y_tr = _load(path / "x_train.npy", mmap), _labels(path / "y_train.npy")
        x_te = y_te = None
        if (path / "x_test.npy").is_file() or (path / "y_test.npy").is_file():
            for f in ("x_test.npy", "y_test.npy"):
                if not (path / f).is_file():
                    raise UserError(f"test split is incomplete: missing {f}", path)
            x_te, y_te = _load(path / "x_test.npy", mmap), _labels(path / "y_test.npy")
        classes: list[str] = []
        cj = path / "classes.json"
        if cj.is_file():
            if cj.stat().st_size > _MAX_JSON:
                raise UserError(f"classes.json is larger than {_MAX_JSON >> 20} MiB; not a list of class names", cj)
            try:
                raw = json.loads(cj.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError, RecursionError) as e:
                raise UserError(f"not valid JSON ({e})", cj) from None
            if not isinstance(raw, list) or not all(isinstance(c, (str, int)) for c in raw):
                raise UserError("classes.json must be a list of class names", cj)
            classes = [str(c) for c in raw]
        return ImageDataset(x_tr, y_tr, x_te, y_te, classes, source=str(path), format=self.name)

    def write(self, ds: ImageDataset, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        save_rows(ds.x_train, path / "x_train.npy")
        np.save(path / "y_train.npy", ds.y_train.astype(np.int64))
        if ds.has_test:
            save_rows(ds.x_test, path / "x_test.npy")  # type: ignore[arg-type]
            np.save(path / "y_test.npy", ds.y_test.astype(np.int64))  # type: ignore[union-attr]
        (path / "classes.json").write_text(json.dumps(ds.classes) + "\n")


FORMATS.register("npy", "folder of .npy files (x_train, y_train, x_test, y_test, classes.json); memory-mapped")(
    NPYFormat())
