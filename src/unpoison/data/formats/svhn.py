"""SVHN cropped digits: ``train_32x32.mat`` / ``test_32x32.mat`` (keys X: 32x32x3xN, y: Nx1, 10 means 0).

MAT files are read with ``scipy.io.loadmat`` (a data parser, no pickle). ``extra_32x32.mat`` is not
read (it is not part of the usual protocol).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from ...errors import UserError
from .._format import FORMATS, DatasetFormat
from ..dataset import ImageDataset

TRAIN, TEST = "train_32x32.mat", "test_32x32.mat"


def _read_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        m = scipy.io.loadmat(str(path), variable_names=["X", "y"])
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
