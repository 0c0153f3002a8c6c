"""MNIST / Fashion-MNIST IDX files (raw or .gz), in a flat folder or torchvision's layout."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from ...errors import UserError
from .._format import FORMATS, DatasetFormat
from .._limits import check_alloc, check_compressed, npy_nbytes, read_exact
from ..dataset import ImageDataset

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGIT_CLASSES = [str(i) for i in range(10)]

_STEMS = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (magic 0x0000TTNN, big-endian dims, then data), streamed.

    The header is read first and checked against the file (raw: exact size; ``.gz``: what deflate
    can hold) and the memory budget; then exactly the declared bytes are read into one buffer and
    anything after them is refused. A small ``.gz`` can never decompress into gigabytes here.
    """
    gz = path.suffix == ".gz"
    try:
        size = path.stat().st_size
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _DTYPES:
                raise UserError("not an IDX file (bad magic number)", path)
            dtype, ndim = np.dtype(_DTYPES[magic[2]]), magic[3]
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise UserError("truncated IDX header", path)
            dims = tuple(int.from_bytes(raw_dims[4 * i: 4 + 4 * i], "big") for i in range(ndim))
            need = npy_nbytes(dims, dtype)
            if gz:
                check_compressed(need + 4 + 4 * ndim, size, f"IDX header (shape {dims})", path)
            elif size - 4 - 4 * ndim != need:
                raise UserError(f"IDX data is {size - 4 - 4 * ndim} bytes, header says {need} for shape {dims}", path)
            check_alloc(need, f"IDX array {dims}", path)
            buf = read_exact(f, need, path, f"IDX data (header says {need} bytes for shape {dims})")
            if f.read(1):
                raise UserError(f"IDX file holds more data than its header says ({need} bytes for shape {dims})", path)
    except UserError:
        raise
    except (OSError, EOFError, zlib.error, ValueError) as e:
        raise UserError(f"cannot read IDX file ({type(e).__name__}: {e})", path) from None
    return np.frombuffer(buf, dtype=dtype).reshape(dims)


def write_idx(arr: np.ndarray, path: Path) -> None:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = head + arr.tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb", compresslevel=6) as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _find(root: Path, stem: str) -> Path | None:
    for d in (root, root / "raw", root / "FashionMNIST" / "raw", root / "MNIST" / "raw"):
        for suffix in (".gz", ""):
            for name in (stem + suffix, stem.replace("-idx", ".idx") + suffix):
                p = d / name
                if p.is_file():
                    return p
    return None


class IDXFormat(DatasetFormat):
    name = "idx"
    priority = 13

    def detect(self, path: Path) -> bool:
        return path.is_dir() and _find(path, _STEMS["x_train"]) is not None

    def read(self, path: Path, mmap: bool = False) -> ImageDataset:
        files = {k: _find(path, stem) for k, stem in _STEMS.items()}
        for k in ("x_train", "y_train"):
            if files[k] is None:
                raise UserError(f"missing {_STEMS[k]}[.gz]", path)
        arrays = {k: read_idx(p) for k, p in files.items() if p is not None}
        for k in ("x_train", "x_test"):
            if k in arrays:
                a = arrays[k]
                if a.dtype != np.uint8 or a.ndim != 3:
                    raise UserError(f"expected uint8 N x H x W images, got {a.dtype} {a.shape}", files[k])
                arrays[k] = a[..., None]
        for k in ("y_train", "y_test"):
            if k in arrays:
                a = arrays[k]
                if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
                    # float labels are refused, never truncated (and NaN never reaches a cast)
                    raise UserError(f"labels must be a 1-D integer array, got {a.dtype} {a.shape}", files[k])
                arrays[k] = a.astype(np.int64)
        is_fashion = "fashion" in str(files["x_train"]).lower()  # also FashionMNIST/raw under path
        k = int(max(arrays["y_train"].max(initial=0), arrays.get("y_test", np.zeros(1, int)).max(initial=0))) + 1
        classes = (FASHION_CLASSES if is_fashion else DIGIT_CLASSES)[:k] if k <= 10 else []
        return ImageDataset(arrays["x_train"], arrays["y_train"], arrays.get("x_test"),
                            arrays.get("y_test"), classes, source=str(path), format=self.name)

    def write(self, ds: ImageDataset, path: Path) -> None:
        if ds.image_shape[2] != 1:
            raise UserError("IDX holds grayscale images only; choose --format npz or imagefolder", path)
        if ds.num_classes > 256:
            raise UserError(f"IDX labels are bytes (at most 256 classes, not {ds.num_classes}); choose --format npz",
                            path)
        path.mkdir(parents=True, exist_ok=True)
        write_idx(ds.x_train[..., 0], path / (_STEMS["x_train"] + ".gz"))
        write_idx(ds.y_train, path / (_STEMS["y_train"] + ".gz"))
        if ds.has_test:
            write_idx(ds.x_test[..., 0], path / (_STEMS["x_test"] + ".gz"))  # type: ignore[index]
            write_idx(ds.y_test, path / (_STEMS["y_test"] + ".gz"))  # type: ignore[arg-type]


FORMATS.register("idx", "MNIST/Fashion-MNIST IDX files (.gz or raw), flat or torchvision layout")(IDXFormat())
