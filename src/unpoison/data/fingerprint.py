"""Content fingerprints: what every resume and cache is keyed by (never a dataset's name or path).

A file replaced at the same path, or another dataset with the same shape and labels, must not be
mistaken for the one a checkpoint was made from. The fingerprint is a SHA-256 streamed over each
array's dtype, shape and bytes a few MiB at a time, so a memory-mapped dataset larger than RAM is
hashed in bounded memory (0.2 s for Fashion-MNIST's training split on a busy 2-core machine); a memmap is
read from its file (:mod:`unpoison.data.rows`), so hashing it leaves no mapped pages in the process's RSS.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

import numpy as np

from .rows import RowReader

if TYPE_CHECKING:
    from .dataset import ImageDataset

_CHUNK = 1 << 24


def content_fingerprint(*arrays: np.ndarray | None, chunk_bytes: int = _CHUNK) -> str:
    """Hex SHA-256 of the arrays' dtypes, shapes and contents (``None`` counts as a distinct entry).

    Reads row blocks of at most ``chunk_bytes``: memory stays bounded for memmaps of any size.
    """
    h = hashlib.sha256(b"unpoison-content-v1")
    for a in arrays:
        if a is None:
            h.update(b"|none|")
            continue
        a = np.asarray(a)
        h.update(f"|{a.dtype.str}|{tuple(a.shape)}|".encode())
        if a.ndim == 0 or a.size == 0:
            h.update(np.ascontiguousarray(a).tobytes())
            continue
        row = max(1, a[0].nbytes)
        step = max(1, chunk_bytes // row)
        with RowReader(a) as r:
            for i in range(0, len(a), step):
                h.update(memoryview(r.read(i, i + step)).cast("B"))
    return h.hexdigest()


def dataset_fingerprint(ds: ImageDataset) -> str:
    """Fingerprint of a whole dataset: both splits' images and labels and the class names."""
    names = np.frombuffer(json.dumps(list(ds.classes)).encode(), dtype=np.uint8)
    return content_fingerprint(ds.x_train, ds.y_train, ds.x_test, ds.y_test, names)
