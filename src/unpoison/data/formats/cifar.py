"""CIFAR-10 / CIFAR-100 "python version" folders (``cifar-10-batches-py``, ``cifar-100-python``).

The files are pickles, so they are read with the restricted unpickler of ``_safe_pickle`` (never
``pickle.load``) and written in the originals' Python-2 layout, so a poisoned or purified CIFAR
keeps working with the usual loaders (``encoding="bytes"`` or ``"latin1"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...errors import UserError, printable
from .._format import FORMATS, DatasetFormat
from .._safe_pickle import Py2Str, dump_py2, safe_load
from ..dataset import ImageDataset

CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


def _key(d: dict[Any, Any], name: str, path: Path) -> Any:
    """``d[name]`` whether the pickle was read with bytes keys (py2 originals) or str keys."""
    for k in (name.encode(), name):
        if k in d:
            return d[k]
    found = sorted(printable(_text(k))[:40] if isinstance(k, (str, bytes)) else type(k).__name__ for k in d)[:8]
    raise UserError(f"pickle has no key {name!r} (found {found})", path)


def _text(v: Any) -> str:
    return v.decode("latin1") if isinstance(v, (bytes, bytearray)) else str(v)


def _names(d: dict[Any, Any], key: str, path: Path) -> list[str]:
    """A list of class names (byte strings in the originals); anything else is refused, never str()-ed."""
    raw = _key(d, key, path)
    if not isinstance(raw, (list, tuple)) or not all(isinstance(c, (bytes, str)) for c in raw):
        raise UserError(f"{key!r} must be a list of names, got {type(raw).__name__}", path)
    return [_text(c) for c in raw]


def _load_dict(path: Path) -> dict[Any, Any]:
    if not path.is_file():
        raise UserError("missing file", path)
    d = safe_load(path)
    if not isinstance(d, dict):
        raise UserError(f"expected a pickled dict, got {type(d).__name__}", path)
    return d


def _images(d: dict[Any, Any], path: Path) -> np.ndarray:
    data = _key(d, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"'data' must be a uint8 N x 3072 array, got {getattr(data, 'dtype', type(data).__name__)} "
                        f"{getattr(data, 'shape', '')}", path)
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _labels(d: dict[Any, Any], key: str, n: int, path: Path) -> np.ndarray:
    raw = _key(d, key, path)
    if isinstance(raw, (list, tuple)):
        if not all(type(v) is int for v in raw):
            raise UserError(f"{key!r} must be a list of integers", path)
        try:
            y = np.array(raw, dtype=np.int64)
        except OverflowError:
            raise UserError(f"{key!r} holds integers beyond 64 bits", path) from None
    elif isinstance(raw, np.ndarray):
        y = raw
    else:
        raise UserError(f"{key!r} must be a list of integers, got {type(raw).__name__}", path)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{key!r} must be a list of integers, got {y.dtype} {y.shape}", path)
    if len(y) != n:
        raise UserError(f"{n} images but {len(y)} labels in {key!r}", path)
    return y.astype(np.int64)


def _check_writable(ds: ImageDataset, path: Path, what: str) -> None:
    if ds.image_shape != (32, 32, 3):
        raise UserError(f"{what} holds 32x32 RGB images, not {ds.image_shape}; choose --format npz or imagefolder",
                        path)


def _batch(x: np.ndarray, y: np.ndarray, label_key: str, batch_label: str, start: int,
           extra: dict[str, list[int]] | None = None) -> dict[Py2Str, Any]:
    n = len(x)
    d: dict[Py2Str, Any] = {
        Py2Str(b"batch_label"): Py2Str(batch_label.encode()),
        Py2Str(label_key.encode()): [int(v) for v in y],
        Py2Str(b"data"): np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)).reshape(n, 3072),
        Py2Str(b"filenames"): [Py2Str(f"image_{start + i:06d}.png".encode()) for i in range(n)],
    }
    for k, v in (extra or {}).items():
        d[Py2Str(k.encode())] = v
    return d


def _dump(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        dump_py2(obj, f)


def _root(path: Path, sub: str, marker: str) -> Path:
    """Accept the data folder itself or its parent (where the tarball was unpacked)."""
    if (path / marker).is_file():
        return path
    if (path / sub / marker).is_file():
        return path / sub
    return path


class CIFAR10Format(DatasetFormat):
    name = "cifar10"
    priority = 10

    def detect(self, path: Path) -> bool:
        root = _root(path, "cifar-10-batches-py", "batches.meta")
        return path.is_dir() and (root / "batches.meta").is_file() and (root / "data_batch_1").is_file()

    def read(self, path: Path, mmap: bool = False) -> ImageDataset:
        root = _root(path, "cifar-10-batches-py", "batches.meta")
        meta = _load_dict(root / "batches.meta")
        names = _names(meta, "label_names", root / "batches.meta")
        xs, ys = [], []
        for b in CIFAR10_TRAIN:
            d = _load_dict(root / b)
            x = _images(d, root / b)
            xs.append(x)
            ys.append(_labels(d, "labels", len(x), root / b))
        x_te = y_te = None
        if (root / "test_batch").exists():
            d = _load_dict(root / "test_batch")
            x_te = _images(d, root / "test_batch")
            y_te = _labels(d, "labels", len(x_te), root / "test_batch")
        return ImageDataset(np.concatenate(xs), np.concatenate(ys), x_te, y_te, names, source=str(root),
                            format=self.name)

    def write(self, ds: ImageDataset, path: Path) -> None:
        _check_writable(ds, path, "CIFAR-10's format")
        path.mkdir(parents=True, exist_ok=True)
        parts = np.array_split(np.arange(len(ds.x_train)), len(CIFAR10_TRAIN))
        for i, (b, idx) in enumerate(zip(CIFAR10_TRAIN, parts)):
            _dump(_batch(ds.x_train[idx], ds.y_train[idx], "labels", f"training batch {i + 1} of 5",
                         int(idx[0]) if len(idx) else 0), path / b)
        if ds.has_test:
            _dump(_batch(ds.x_test, ds.y_test, "labels", "testing batch 1 of 1", 0),  # type: ignore[arg-type]
                  path / "test_batch")
        per = max((len(p) for p in parts), default=0)
        _dump({Py2Str(b"label_names"): [Py2Str(c.encode()) for c in ds.classes],
               Py2Str(b"num_cases_per_batch"): per, Py2Str(b"num_vis"): 3072}, path / "batches.meta")


class CIFAR100Format(DatasetFormat):
    name = "cifar100"
    priority = 11

    def detect(self, path: Path) -> bool:
        root = _root(path, "cifar-100-python", "meta")
        return path.is_dir() and (root / "meta").is_file() and (root / "train").is_file()

    def read(self, path: Path, mmap: bool = False) -> ImageDataset:
        root = _root(path, "cifar-100-python", "meta")
        meta = _load_dict(root / "meta")
        names = _names(meta, "fine_label_names", root / "meta")
        d = _load_dict(root / "train")
        x_tr = _images(d, root / "train")
        y_tr = _labels(d, "fine_labels", len(x_tr), root / "train")
        attrs: dict[str, Any] = {}
        if b"coarse_labels" in d or "coarse_labels" in d:
            # keep the fine -> coarse map so a written copy has the superclasses too
            yc = _labels(d, "coarse_labels", len(x_tr), root / "train")
            fine_to_coarse = [-1] * len(names)
            for f, c in zip(y_tr.tolist(), yc.tolist()):
                if 0 <= f < len(names):
                    fine_to_coarse[f] = c
            attrs["cifar100_coarse_of_fine"] = fine_to_coarse
            for k in ("coarse_label_names",):
                if k.encode() in meta or k in meta:
                    attrs["cifar100_coarse_label_names"] = _names(meta, k, root / "meta")
        x_te = y_te = None
        if (root / "test").exists():
            d = _load_dict(root / "test")
            x_te = _images(d, root / "test")
            y_te = _labels(d, "fine_labels", len(x_te), root / "test")
        return ImageDataset(x_tr, y_tr, x_te, y_te, names, source=str(root), format=self.name, attrs=attrs)

    def write(self, ds: ImageDataset, path: Path) -> None:
        _check_writable(ds, path, "CIFAR-100's format")
        path.mkdir(parents=True, exist_ok=True)
        c_of_f = ds.attrs.get("cifar100_coarse_of_fine")
        ok = isinstance(c_of_f, list) and len(c_of_f) == ds.num_classes and min(c_of_f, default=-1) >= 0
        meta: dict[Py2Str, Any] = {Py2Str(b"fine_label_names"): [Py2Str(c.encode()) for c in ds.classes]}
        if ok:  # superclasses only when they are known (never invented)
            cmap = np.asarray(c_of_f, dtype=np.int64)
            cnames = ds.attrs.get("cifar100_coarse_label_names") or [str(i) for i in range(int(cmap.max()) + 1)]
            meta[Py2Str(b"coarse_label_names")] = [Py2Str(str(c).encode()) for c in cnames]
        for split, x, y, label in (("train", ds.x_train, ds.y_train, "training batch 1 of 1"),
                                   ("test", ds.x_test, ds.y_test, "testing batch 1 of 1")):
            if x is None or y is None:
                continue
            extra = {"coarse_labels": [int(v) for v in cmap[y]]} if ok else None
            _dump(_batch(x, y, "fine_labels", label, 0, extra), path / split)
        _dump(meta, path / "meta")


FORMATS.register("cifar10", "CIFAR-10 python version folder (cifar-10-batches-py); read with a safe unpickler")(
    CIFAR10Format())
FORMATS.register("cifar100", "CIFAR-100 python version folder (cifar-100-python), fine labels; safe unpickler")(
    CIFAR100Format())
