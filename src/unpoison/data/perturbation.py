"""Released perturbation files (``unpoison poison --from-perturbation FILE``): untrusted input like any
dataset, so read here, beside the dataset readers, under the same rules: ``.npy`` with
``allow_pickle=False`` and its header checked against the file size before numpy allocates, ``.pt`` with
``torch.load(weights_only=True)`` and every zip record's claimed size checked against what it holds."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ._limits import check_alloc, check_compressed, check_npy_file


def _check_pt_sizes(path: Path) -> None:
    """A ``.pt`` zip's records may not claim more than they hold (torch allocates a record's claimed size)."""
    check_alloc(path.stat().st_size, "the perturbation file", path)
    if not zipfile.is_zipfile(path):
        return  # legacy format: torch reads it as a stream, bounded by the file
    with zipfile.ZipFile(path) as z:
        total = 0
        for info in z.infolist():
            if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
                raise UserError(f"record {info.filename!r} claims {info.file_size} bytes but holds "
                                f"{info.compress_size}", path)
            check_compressed(info.file_size, info.compress_size, f"record {info.filename!r}", path)
            total += info.file_size
    check_alloc(total, "the perturbation", path)


def load_perturbation(path: str | Path) -> np.ndarray:
    """A perturbation array from ``.npy`` (no pickles) or ``.pt`` (weights_only); UserError otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError("no such file", path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            check_npy_file(path)  # header vs file size vs budget before numpy allocates the claim
            arr = np.load(path, allow_pickle=False)
        elif suffix in (".pt", ".pth"):
            _check_pt_sizes(path)
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:  # torch's own text is a page of advice on weights_only=False
                raise UserError("not a plain tensor file: it holds pickled code or objects that "
                                "torch.load(weights_only=True) refuses to run; save the tensor alone", path) from None
            if isinstance(obj, dict) and len(obj) == 1:
                obj = next(iter(obj.values()))
            if not isinstance(obj, torch.Tensor):
                raise UserError(f"expected a tensor, found {type(obj).__name__}", path)
            arr = obj.float().numpy() if obj.is_floating_point() else obj.numpy()
        else:
            raise UserError("perturbation must be a .npy or .pt file", path)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"cannot read perturbation: {type(e).__name__}: {first}", path) from None
    return np.asarray(arr)
