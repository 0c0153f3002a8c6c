"""Datasets: one in-memory form (:class:`ImageDataset`), safe loaders and atomic writers.

A dataset is named by a *spec* wherever one is expected:

* a registered name: ``fmnist`` (Debian's ``/usr/share/datasets/fashion-mnist`` or
  ``$UNPOISON_DATA/fashion-mnist``), ``mnist``, ``synthetic`` (tiny generated data);
* ``FORMAT:PATH`` (``cifar10:~/data/cifar-10-batches-py``, ``npz:poisoned.npz``);
* a plain path, whose format is detected.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from .._registry import Registry
from ..errors import UserError
from ..utils import atomic_path
from . import formats  # noqa: F401  (registers the formats)
from ._format import FORMATS, DatasetFormat
from .dataset import ImageDataset
from .synthetic import make_synthetic

__all__ = ["ImageDataset", "load_dataset", "save_dataset", "FORMATS", "DATASETS", "DatasetFormat",
           "make_synthetic", "detect_format"]

#: named datasets: name -> callable(arg) returning an ImageDataset
DATASETS: Registry[Callable[[str], ImageDataset]] = Registry("dataset")


def _data_roots(sub: str) -> list[Path]:
    roots = []
    if os.environ.get("UNPOISON_DATA"):
        roots.append(Path(os.environ["UNPOISON_DATA"]) / sub)
    roots += [Path("/usr/share/datasets") / sub, Path.home() / ".cache" / "unpoison" / sub]
    return roots


def _named_idx(sub: str, label: str) -> Callable[[str], ImageDataset]:
    def load(arg: str) -> ImageDataset:
        if arg:
            return FORMATS.get("idx").read(Path(arg).expanduser())
        for root in _data_roots(sub):
            if FORMATS.get("idx").detect(root):
                return FORMATS.get("idx").read(root)
        hint = ("install it with 'apt-get install dataset-fashion-mnist'" if sub == "fashion-mnist"
                else f"put the IDX files in $UNPOISON_DATA/{sub}")
        raise UserError(f"{label} not found in {', '.join(map(str, _data_roots(sub)))}; {hint}")

    return load


DATASETS.register("fmnist", "Fashion-MNIST (Debian dataset-fashion-mnist or $UNPOISON_DATA)")(
    _named_idx("fashion-mnist", "Fashion-MNIST"))
DATASETS.register("mnist", "MNIST IDX files in $UNPOISON_DATA/mnist")(_named_idx("mnist", "MNIST"))
DATASETS.register("synthetic", "generated data: synthetic:n=512,size=16,channels=3,classes=4,seed=0")(
    lambda arg: make_synthetic(**_kv(arg)))


def _named_folder(fmt: str, subs: tuple[str, ...], label: str) -> Callable[[str], ImageDataset]:
    """A named dataset found in the data roots (``$UNPOISON_DATA/<sub>`` etc.) in format ``fmt``."""

    def load(arg: str) -> ImageDataset:
        tried = [r for sub in subs for r in _data_roots(sub)]
        for root in tried:
            if FORMATS.get(fmt).detect(root):
                return FORMATS.get(fmt).read(root)
        raise UserError(f"{label} not found in {', '.join(map(str, tried))}; unpack it under $UNPOISON_DATA "
                        f"or pass {fmt}:PATH")

    return load


for _name, _fmt, _subs, _label in (("cifar10", "cifar10", ("cifar-10-batches-py",), "CIFAR-10"),
                                   ("cifar100", "cifar100", ("cifar-100-python",), "CIFAR-100"),
                                   ("svhn", "svhn", ("svhn",), "SVHN")):
    DATASETS.register(_name, f"{_label} in $UNPOISON_DATA/{_subs[0]} (or {_fmt}:PATH)")(
        _named_folder(_fmt, _subs, _label))
_ALIASES = {"fashion-mnist": "fmnist", "fashionmnist": "fmnist", "cifar-10": "cifar10", "cifar-100": "cifar100"}


def _kv(arg: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in filter(None, arg.split(",")):
        k, _, v = part.partition("=")
        try:
            out[k.strip()] = int(v)
        except ValueError:
            raise UserError(f"bad synthetic option {part!r}; expected key=integer") from None
    return out


def detect_format(path: Path) -> DatasetFormat:
    """The format of ``path``: formats are tried by ``priority`` (specific layouts first), never by name."""
    path = Path(path)
    order = sorted((FORMATS.get(n) for n in FORMATS), key=lambda f: (f.priority, f.name))
    for fmt in order:
        if not fmt.autodetect:
            continue
        try:
            if fmt.detect(path):
                return fmt
        except OSError:  # unreadable sub-folder etc.: not this format
            continue
    what = f"file type {path.suffix or '(no suffix)'!r}" if path.is_file() else "folder layout"
    known = ", ".join(f.name for f in order)
    raise UserError(f"unknown dataset format: {what} (known: {known}; or say FORMAT:PATH)", path)


def load_dataset(spec: str | Path, mmap: bool = False, validate: bool = True) -> ImageDataset:
    """Load a dataset from a spec (see module doc). Never executes code from the files.

    ``mmap=True`` memory-maps images where the format allows it (``npy`` folders).
    """
    s = str(spec)
    name, sep, arg = s.partition(":")
    key = _ALIASES.get(name.lower(), name.lower())
    if sep and key not in FORMATS and key not in DATASETS and not Path(s).exists() \
            and re.fullmatch(r"[a-z][a-z0-9_-]+", key):
        raise UserError(f"unknown dataset format or name {name!r} in {s!r}; formats: {', '.join(FORMATS.names())}; "
                        f"names: {', '.join(DATASETS.names())}")
    if sep and key in FORMATS and not Path(s).exists():
        path = Path(arg).expanduser()
        if not path.exists():
            raise UserError("no such file or directory", path)
        ds = FORMATS.get(key).read(path, mmap=mmap)
    elif key in DATASETS and not Path(s).exists():
        ds = DATASETS.get(key)(arg)
    else:
        path = Path(s).expanduser()
        if not path.exists():
            raise UserError("no such file or directory", path)
        ds = detect_format(path).read(path, mmap=mmap)
    return ds.validate() if validate else ds


def save_dataset(ds: ImageDataset, path: str | Path, format: str | None = None) -> Path:  # noqa: A002
    """Write ``ds`` atomically (temporary sibling, then rename) in ``format``.

    Without ``format``: NPZ when ``path`` ends in ``.npz`` (the name says so), else the input's format.
    """
    if format is None and Path(path).suffix.lower() == ".npz":
        format = "npz"  # noqa: A001
    fmt = FORMATS.get(format or ds.format)
    if not fmt.writable:
        fmt = FORMATS.get("npz")
    ds.validate()
    path = Path(path).expanduser()
    with atomic_path(path, is_dir=fmt.writes_dir) as tmp:
        fmt.write(ds, tmp)
    return path
