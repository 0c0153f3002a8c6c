"""The one in-memory form of a labelled image dataset.

Images are uint8 ``N x H x W x C`` numpy arrays (possibly memory-mapped), labels int64 ``N``.
Everything downstream (attacks, defenses, training) takes and returns this form, so formats are a
concern of loaders and writers only.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError, printable


@dataclass
class ImageDataset:
    """A train split, an optional test split, and class names.

    ``source`` names the file or folder the data came from (used in error messages) and
    ``format`` the format it was read in (writers keep it unless told otherwise).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    classes: list[str] = field(default_factory=list)
    source: str = "<memory>"
    format: str = "npz"
    #: format-specific facts a writer may need to keep the format (JSON-able; e.g. CIFAR-100's coarse
    #: label of each fine class). Per class, never per image, so subsets and replacements keep it valid.
    attrs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.classes:
            self.classes = [str(i) for i in range(_inferred_classes(self))]
        self.classes = [str(c) for c in self.classes]

    # --- shape facts -------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C)."""
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def has_test(self) -> bool:
        return self.x_test is not None and self.y_test is not None

    def replace(self, **changes: object) -> ImageDataset:
        return replace(self, **changes)

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> ImageDataset:
        """A class-stratified random subset (keeps the class balance of small presets honest)."""
        rng = np.random.default_rng(seed)

        def pick(y: np.ndarray, n: int | None) -> np.ndarray:
            if n is None or n >= len(y):
                return np.arange(len(y))
            idx = []
            classes = np.unique(y)
            per = [np.flatnonzero(y == c) for c in classes]
            share = np.floor(n * np.array([len(p) for p in per]) / len(y)).astype(int)
            for p, k in zip(per, share):
                idx.append(rng.choice(p, size=k, replace=False))
            idx = np.concatenate(idx)
            rest = np.setdiff1d(np.arange(len(y)), idx)
            idx = np.concatenate([idx, rng.choice(rest, size=n - len(idx), replace=False)])
            return np.sort(idx)

        it = pick(self.y_train, n_train)
        out = self.replace(x_train=np.ascontiguousarray(self.x_train[it]), y_train=self.y_train[it])
        if self.has_test:
            ie = pick(self.y_test, n_test)  # type: ignore[arg-type]
            out = out.replace(x_test=np.ascontiguousarray(self.x_test[ie]), y_test=self.y_test[ie])  # type: ignore[index]
        return out

    # --- validation --------------------------------------------------------------------------
    def validate(self) -> ImageDataset:
        """Check dtypes, shapes, label ranges and classes; raise a one-line :class:`UserError`."""
        src = self.source
        check_class_names(self.classes, src)
        _check_split(self.x_train, self.y_train, "train", src, self.num_classes)
        if len(self.x_train) == 0:
            raise UserError("training split is empty", src)
        counts = np.bincount(self.y_train.astype(np.int64), minlength=self.num_classes)
        empty = [self.classes[i] for i in np.flatnonzero(counts == 0)]
        if empty:
            raise UserError(f"class(es) with no training image: {', '.join(empty[:5])}", src)
        if (self.x_test is None) != (self.y_test is None):
            raise UserError("test split has images but no labels (or the reverse)", src)
        if self.x_test is not None and self.y_test is not None:
            _check_split(self.x_test, self.y_test, "test", src, self.num_classes)
            if self.x_test.shape[1:] != self.x_train.shape[1:]:
                raise UserError(
                    f"test images are {self.x_test.shape[1:]} but train images are {self.x_train.shape[1:]}",
                    src,
                )
        return self

    def describe(self) -> dict[str, object]:
        """Facts for ``unpoison info``."""
        d: dict[str, object] = {
            "source": self.source,
            "format": self.format,
            "image_shape_hwc": list(self.image_shape),
            "num_classes": self.num_classes,
            "classes": self.classes,
            "train": _split_facts(self.x_train, self.y_train, self.num_classes),
        }
        if self.has_test:
            d["test"] = _split_facts(self.x_test, self.y_test, self.num_classes)  # type: ignore[arg-type]
        return d


def _is_labels(y: object) -> bool:
    return isinstance(y, np.ndarray) and y.ndim == 1 and np.issubdtype(y.dtype, np.integer)


def _inferred_classes(ds: ImageDataset) -> int:
    """Class count when no names are given: max label + 1, refused when it exceeds the training images.

    Every class needs a training image (``validate``), so a larger count can only come from a bad
    label; refusing it here keeps one label of 10**12 from building a list of 10**12 names.
    """
    n = 0
    for y in (ds.y_train, ds.y_test):
        if y is not None and _is_labels(y) and len(y):
            n = max(n, int(y.max()) + 1)
    n_train = len(ds.y_train) if _is_labels(ds.y_train) else 0
    if n > max(n_train, 1):
        raise UserError(f"labels go up to {n - 1} but there are only {n_train} training images and no class "
                        "names; every class needs a training image", ds.source)
    return n


#: a class name longer than this is not a name (and would flood a terminal or a report)
MAX_CLASS_NAME = 256


def check_class_names(classes: list[str], src: str | Path) -> None:
    """Names must be non-empty, printable (no control characters), short and unique."""
    seen: dict[str, int] = {}
    for i, c in enumerate(classes):
        if not isinstance(c, str) or not c.strip():
            raise UserError(f"class name {i} is empty", src)
        if len(c) > MAX_CLASS_NAME:
            raise UserError(f"class name {i} is {len(c)} characters long (at most {MAX_CLASS_NAME})", src)
        if any(unicodedata.category(ch)[0] == "C" for ch in c):
            raise UserError(f"class name {i} ({printable(c)}) holds control characters", src)
        if c in seen:
            raise UserError(f"class name {printable(c)!r} appears twice (classes {seen[c]} and {i})", src)
        seen[c] = i


def _check_split(x: np.ndarray, y: np.ndarray, name: str, src: str, k: int) -> None:
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8:
        raise UserError(f"{name} images must be uint8, got {getattr(x, 'dtype', type(x).__name__)}", src)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise UserError(f"{name} images must be N x H x W x C with C in (1, 3), got shape {x.shape}", src)
    if not isinstance(y, np.ndarray) or y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{name} labels must be a 1-D integer array, got {getattr(y, 'dtype', type(y))} "
                        f"{getattr(y, 'shape', '')}", src)
    if len(y) != len(x):
        raise UserError(f"{name} has {len(x)} images but {len(y)} labels", src)
    if len(y) and (y.min() < 0 or y.max() >= k):
        raise UserError(f"{name} labels out of range: [{y.min()}, {y.max()}] for {k} classes", src)


def _split_facts(x: np.ndarray, y: np.ndarray, k: int) -> dict[str, object]:
    sample = x[: min(len(x), 4096)]
    return {
        "n": int(len(x)),
        "shape": list(x.shape),
        "dtype": str(x.dtype),
        "value_range": [int(sample.min()), int(sample.max())] if len(x) else None,
        "per_class": np.bincount(y, minlength=k).tolist(),
        "memory_mapped": isinstance(x, np.memmap),
    }
