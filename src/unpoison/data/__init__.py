"""Datasets: one in-memory form (:class:`ImageDataset`), safe loaders and atomic writers.

A dataset is named by a *spec* wherever one is expected:

* a registered name: ``fmnist`` (Debian's ``/usr/share/datasets/fashion-mnist`` or
  ``$UNPOISON_DATA/fashion-mnist``), ``mnist``, ``synthetic`` (tiny generated data);
* ``FORMAT:PATH`` (``cifar10:~/data/cifar-10-batches-py``, ``npz:poisoned.npz``);
* a plain path, whose format is detected.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._registry import Registry
from ..errors import UserError, printable
from ..outputs import atomic_path, check_output, guard_inputs, policy_for, recover, report_dir, write_marker
from ..params import unknown
from . import formats  # noqa: F401  (registers the formats)
from ._format import FORMATS, DatasetFormat
from ._limits import check_alloc
from .dataset import ImageDataset
from .fingerprint import content_fingerprint, dataset_fingerprint
from .icons import load as _load_icons
from .synthetic import make_synthetic

__all__ = ["ImageDataset", "load_dataset", "save_dataset", "FORMATS", "DATASETS", "DatasetFormat",
           "make_synthetic", "detect_format", "spec_path", "output_format", "content_fingerprint",
           "dataset_fingerprint"]

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
    lambda arg: make_synthetic(**_synthetic_options(arg)))


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
DATASETS.register("icons", "RGB icons from Debian icon themes, 6 classes, 32x32 ('make rgb-data'; icons:PATH)")(
    _load_icons)
_ALIASES = {"fashion-mnist": "fmnist", "fashionmnist": "fmnist", "cifar-10": "cifar10", "cifar-100": "cifar100"}


#: synthetic's options: name -> (smallest, largest) value
_SYNTHETIC = {"n": (1, 10**7), "size": (4, 1024), "channels": (1, 3), "classes": (1, 10**4), "seed": (0, 2**32 - 1),
              "n_test": (0, 10**7), "signal": (0, 255)}


def _synthetic_options(arg: str) -> dict[str, int]:
    """``n=512,size=16,...`` -> checked keyword arguments of :func:`make_synthetic` (ranges, memory)."""
    out: dict[str, int] = {}
    for part in filter(None, arg.split(",")):
        k, _, v = part.partition("=")
        k = k.strip()
        if k not in _SYNTHETIC:
            raise unknown("synthetic option", printable(k), _SYNTHETIC)
        try:
            val = int(v)
        except ValueError:
            raise UserError(f"bad synthetic option {printable(part)!r}; expected key=integer") from None
        lo, hi = _SYNTHETIC[k]
        if not lo <= val <= hi:
            raise UserError(f"synthetic option {k} must be in [{lo}, {hi}], got {val}")
        out[k] = val
    if out.get("channels", 3) == 2:
        raise UserError("synthetic option channels must be 1 or 3")
    n, classes = out.get("n", 512), out.get("classes", 4)
    if classes > n:
        raise UserError(f"synthetic data with {classes} classes needs n >= {classes}, got n={n}")

    size, c = out.get("size", 16), out.get("channels", 3)
    n_all = n + out.get("n_test", n // 4)
    # float64 working arrays while generating: 8 bytes a value, twice
    check_alloc(16 * n_all * size * size * c, f"synthetic data ({n_all} images of {size}x{size}x{c})", "synthetic")
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


def spec_path(spec: str | Path) -> Path | None:
    """The file or folder a spec names (``PATH``, ``FORMAT:PATH``, ``mnist:PATH``), or None for a named dataset."""
    s = str(spec)
    if os.path.lexists(Path(s).expanduser()):
        return Path(s).expanduser()
    name, sep, arg = s.partition(":")
    key = _ALIASES.get(name.lower(), name.lower())
    if sep and arg and (key in FORMATS or key in DATASETS) and key != "synthetic":
        return Path(arg).expanduser()
    return None


#: what a malformed file can make a parser raise; anything of these from a reader is the file's fault
_PARSE_ERRORS = (ValueError, OSError, EOFError, KeyError, IndexError, TypeError, struct.error, zlib.error,
                 zipfile.BadZipFile, OverflowError, RecursionError, UnicodeDecodeError)


def _read(fmt: DatasetFormat, path: Path, mmap: bool) -> ImageDataset:
    try:
        return fmt.read(path, mmap=mmap)
    except UserError:
        raise
    except _PARSE_ERRORS as e:  # a reader missed a case: still one line naming the file, not a traceback
        raise UserError(f"cannot read as {fmt.name} ({type(e).__name__}: {printable(e)})", path) from None


def _missing(path: Path) -> UserError:
    return UserError("no such file or directory", path)


def _existing(path: Path) -> bool:
    """Whether ``path`` exists, after putting back a folder an interrupted write of ours left moved aside."""
    if not os.path.lexists(path):
        with contextlib.suppress(OSError):
            recover(path)
    return path.exists()


def load_dataset(spec: str | Path, mmap: bool = False, validate: bool = True) -> ImageDataset:
    """Load a dataset from a spec (see module doc). Never executes code from the files.

    ``mmap=True`` memory-maps images where the format allows it (``npy`` folders). Every size a
    file claims is checked before allocation; any problem is one :class:`UserError` naming the file.
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
        if not _existing(path):
            raise _missing(path)
        ds = _read(FORMATS.get(key), path, mmap)
    elif key in DATASETS and not Path(s).exists():
        ds = DATASETS.get(key)(arg)
    else:
        path = Path(s).expanduser()
        if not _existing(path):
            raise _missing(path)
        ds = _read(detect_format(path), path, mmap)
    return ds.validate() if validate else ds


def output_format(ds: ImageDataset, path: str | Path, format: str | None = None) -> DatasetFormat:  # noqa: A002
    """The format :func:`save_dataset` writes: ``format``; else NPZ for a ``.npz`` name; else the input's."""
    if format is None and Path(path).suffix.lower() == ".npz":
        format = "npz"  # noqa: A001
    fmt = FORMATS.get(format or ds.format)
    return fmt if fmt.writable else FORMATS.get("npz")


def save_dataset(ds: ImageDataset, path: str | Path, format: str | None = None,  # noqa: A002
                 overwrite: bool = False) -> Path:
    """Write ``ds`` atomically in ``format`` (see :func:`output_format`), under the output contract.

    An existing ``path`` is refused unless ``overwrite``, and even then only a dataset unpoison wrote
    is replaced (see :mod:`unpoison.outputs`); ``path`` may not be, contain or lie inside the file
    the dataset was read from. The written dataset carries unpoison's marker.
    """
    fmt = output_format(ds, path, format)
    ds.validate()
    path = Path(path).expanduser()
    guard_inputs(path, [ds.source])
    with atomic_path(path, is_dir=fmt.writes_dir, policy=policy_for(overwrite),
                     hint="--overwrite (overwrite=True in the API)") as tmp:
        fmt.write(ds, tmp)
        if fmt.writes_dir:
            write_marker(tmp, "dataset", format=fmt.name)
    return path


# --- the checks a command makes before any work (the output contract, with specs resolved) ------------------
def check_file_output(output: str | Path, specs: list[str | None], overwrite: bool,
                      sources: list[Any] | tuple[Any, ...] = ()) -> None:
    """Refuse a file OUT (a CSV, a JSON record, a checkpoint) before any work (the output
    contract of unpoison.outputs).

    Called once before loading (``specs``: the input specs) and once after (``sources``: the loaded
    datasets' resolved locations)."""
    inputs = [spec_path(s) if s else None for s in specs] + list(sources)
    check_output(output, inputs=inputs, overwrite=overwrite, is_dir=False, dataset=False)


def check_dataset_output(output: str | Path, input_spec: str, overwrite: bool, ds: Any = None,
                         fmt: str | None = None) -> None:
    """Refuse a dataset OUT (and its report folder) before any work (the output contract of
    unpoison.outputs).

    Called once before loading (existence, OUT = IN) and once after (``ds`` known: the output's
    kind, file or folder, and the input's resolved location).
    """
    inputs = [spec_path(input_spec)] + ([ds.source] if ds is not None else [])
    is_dir = output_format(ds, output, fmt).writes_dir if ds is not None else None
    check_output(output, inputs=inputs, overwrite=overwrite, is_dir=is_dir)
    rdir = report_dir(output)
    guard_inputs(rdir, inputs)
    if rdir.exists() and not rdir.is_dir():
        raise UserError("exists and is not a folder (the report folder of the output)", rdir)
