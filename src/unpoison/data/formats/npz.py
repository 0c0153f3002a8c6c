"""NPZ with keys x_train, y_train, x_test, y_test, classes (the hand-over format of many tools)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ...errors import UserError
from .._format import FORMATS, DatasetFormat
from ..dataset import ImageDataset


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
            # allow_pickle=False: an .npz holding object arrays is refused instead of unpickled
            with np.load(path, allow_pickle=False) as z:
                keys = set(z.files)
                if not {"x_train", "y_train"} <= keys:
                    raise UserError(f"NPZ needs keys x_train and y_train, found {sorted(keys)}", path)
                x_tr, y_tr = z["x_train"], z["y_train"]
                x_te = z["x_test"] if "x_test" in keys else None
                y_te = z["y_test"] if "y_test" in keys else None
                classes = [str(c) for c in z["classes"].tolist()] if "classes" in keys else []
        except UserError:
            raise
        except ValueError as e:
            raise UserError(f"cannot read NPZ ({e})", path) from None
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            raise UserError(f"corrupt or unreadable NPZ ({e})", path) from None
        # Keras-style MNIST NPZs hold N x H x W grayscale: give them their channel axis
        x_tr = x_tr[..., None] if x_tr.ndim == 3 else x_tr
        x_te = x_te[..., None] if x_te is not None and x_te.ndim == 3 else x_te
        for name, y in (("y_train", y_tr), ("y_test", y_te)):
            if y is not None and not np.issubdtype(y.dtype, np.integer):
                raise UserError(f"{name} must be integers, got {y.dtype}", path)
        return ImageDataset(
            x_tr, y_tr.astype(np.int64), x_te, None if y_te is None else y_te.astype(np.int64),
            classes, source=str(path), format=self.name,
        )

    def write(self, ds: ImageDataset, path: Path) -> None:
        arrays = {"x_train": np.asarray(ds.x_train), "y_train": ds.y_train.astype(np.int64),
                  "classes": np.array(ds.classes, dtype=str)}
        if ds.has_test:
            arrays["x_test"] = np.asarray(ds.x_test)
            arrays["y_test"] = ds.y_test.astype(np.int64)  # type: ignore[union-attr]
        with open(path, "wb") as f:
            np.savez(f, **arrays)


FORMATS.register("npz", "NPZ file with x_train/y_train/x_test/y_test/classes")(NPZFormat())
