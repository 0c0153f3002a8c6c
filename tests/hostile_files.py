"""Builders of small hostile files (shared by the tests and ``tests/hostile_corpus.py``).

Each builder writes a few bytes or kilobytes that claim to be huge, or that are malformed in a way
issue 13 found, and returns the dataset spec to hand to ``unpoison``. Nothing here is a valid
dataset unless its name says so.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from unpoison.data import make_synthetic, save_dataset

#: Python source that arms a SIGKILL at one instant of an output write (``sys.argv[1]``): ``between-renames``
#: (the fallback swap without renameat2: the final path moved aside, the new one not yet in place),
#: ``after-exchange`` (swapped atomically, the old copy not yet removed), ``while-writing`` (half an NPZ
#: written). A child process runs it, then its own action; shared by ``tests/test_outputs.py`` and
#: ``tests/hostile_corpus.py``.
KILL_AT = r"""
import os, signal, sys
import numpy as np
import unpoison.outputs as o
where = sys.argv[1]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if where == "between-renames":
    o._exchange = lambda a, b: False
    real = os.rename
    def rename(a, b):
        real(a, b)
        if str(b).endswith(".old"):
            die()
    os.rename = rename
elif where == "after-exchange":
    real_x = o._exchange
    o._exchange = lambda a, b: (real_x(a, b), die())
elif where == "while-writing":
    def savez(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        f.flush()
        die()
    np.savez = savez
"""


def _npy_header(shape: tuple[int, ...], dtype: str = "|u1") -> bytes:
    """Magic string and header of a .npy claiming ``shape`` (no data)."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _small() -> dict[str, np.ndarray]:
    ds = make_synthetic(n=8, size=8, channels=1, classes=2, seed=0)
    return {"x_train": ds.x_train, "y_train": ds.y_train, "x_test": ds.x_test, "y_test": ds.y_test}


def good_npz(d: Path) -> str:
    return str(save_dataset(make_synthetic(n=16, size=8, channels=1, classes=2, seed=0), d / "good.npz"))


# --- NPZ --------------------------------------------------------------------------------------------------
def npz_claiming_billion_images(d: Path) -> str:
    """x_train's header says 10**9 x 28 x 28 x 1 (730 GiB); the member holds 100 bytes."""
    p = d / "billion.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x_train.npy", _npy_header((10**9, 28, 28, 1)) + b"\x00" * 100)
        z.writestr("y_train.npy", _npy_bytes(np.zeros(4, np.int64)))
    return str(p)


def npz_lying_zip_size(d: Path) -> str:
    """A deflated member whose zip entry claims 4 GiB uncompressed (and a header to match) from ~100 bytes."""
    p = d / "zipsize.npz"
    shape = (4 * 2**30 // 784, 28, 28, 1)
    body = _npy_header(shape) + b"\x00" * 64
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x_train.npy", body)
        z.writestr("y_train.npy", _npy_bytes(np.zeros(4, np.int64)))
    raw = bytearray(p.read_bytes())
    claim = len(body) - 64 + shape[0] * 784
    claim = min(claim, 0xFFFFFFFE)
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        i = raw.find(sig)  # the first entry is x_train.npy
        struct.pack_into("<I", raw, i + off, claim)
    p.write_bytes(bytes(raw))
    return str(p)


def npz_huge_label(d: Path) -> str:
    """One label of 10**12 and no class names: must not build 10**12 names."""
    p = d / "hugelabel.npz"
    a = _small()
    a["y_train"] = a["y_train"].copy()
    a["y_train"][0] = 10**12
    np.savez(p, **a)
    return str(p)


def npz_0d_labels(d: Path) -> str:
    p = d / "zerod.npz"
    a = _small()
    a["y_train"] = np.array(1)
    np.savez(p, **a)
    return str(p)


def npz_duplicate_classes(d: Path) -> str:
    p = d / "dupnames.npz"
    np.savez(p, **_small(), classes=np.array(["cat", "cat"]))
    return str(p)


def npz_escape_classes(d: Path) -> str:
    """Class names holding terminal escape sequences (would recolour or clear a terminal)."""
    p = d / "escnames.npz"
    np.savez(p, **_small(), classes=np.array(["\x1b[2J\x1b[31mred", "ok"]))
    return str(p)


def npz_object_arrays(d: Path) -> str:
    p = d / "objects.npz"
    a = _small()
    a["classes"] = np.array([{"a": 1}, None], dtype=object)
    np.savez(p, **a)
    return str(p)


# --- IDX ----------------------------------------------------------------------------------------------------
def _idx(shape: tuple[int, ...], code: int = 0x08) -> bytes:
    return bytes([0, 0, code, len(shape)]) + b"".join(int(s).to_bytes(4, "big") for s in shape)


def _idx_labels(root: Path, n: int = 8) -> None:
    (root / "train-labels-idx1-ubyte").write_bytes(_idx((n,)) + bytes(i % 2 for i in range(n)))


def idx_raw_claiming_billion(d: Path) -> str:
    root = d / "idx-raw"
    root.mkdir()
    (root / "train-images-idx3-ubyte").write_bytes(_idx((10**9, 28, 28)) + b"\x00" * 100)
    _idx_labels(root)
    return str(root)


def idx_gz_claiming_beyond_deflate(d: Path) -> str:
    """A 100-byte .gz whose header claims 10**6 images (784 MB): more than deflate could hold."""
    root = d / "idx-gzclaim"
    root.mkdir()
    with gzip.open(root / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(_idx((10**6, 28, 28)) + b"\x00" * 64)
    _idx_labels(root)
    return str(root)


def idx_gz_trailing_bomb(d: Path, mb: int = 64) -> str:
    """Header says 8 images; the .gz (about 64 KB) inflates to 64 MB: must never be inflated whole."""
    root = d / "idx-gzbomb"
    root.mkdir()
    with gzip.open(root / "train-images-idx3-ubyte.gz", "wb", compresslevel=9) as f:
        f.write(_idx((8, 28, 28)) + b"\x00" * (8 * 784))
        zeros = b"\x00" * (1 << 20)
        for _ in range(mb):
            f.write(zeros)
    _idx_labels(root)
    return str(root)


def idx_float_nan_labels(d: Path) -> str:
    root = d / "idx-nan"
    root.mkdir()
    (root / "train-images-idx3-ubyte").write_bytes(_idx((8, 4, 4)) + bytes(8 * 16))
    labels = np.array([0, 1, np.nan, 1, 0, 1, 0, 1], dtype=">f4")
    (root / "train-labels-idx1-ubyte").write_bytes(_idx((8,), 0x0D) + labels.tobytes())
    return str(root)


# --- npy folder -----------------------------------------------------------------------------------------------
def npy_claiming_billion(d: Path) -> str:
    root = d / "npy-claim"
    root.mkdir()
    (root / "x_train.npy").write_bytes(_npy_header((10**9, 28, 28, 1)) + b"\x00" * 100)
    np.save(root / "y_train.npy", np.zeros(4, np.int64))
    return str(root)


def npy_labels_claiming(d: Path) -> str:
    root = d / "npy-labels"
    root.mkdir()
    np.save(root / "x_train.npy", np.zeros((4, 8, 8, 1), np.uint8))
    (root / "y_train.npy").write_bytes(_npy_header((10**10,), "<i8") + b"\x00" * 32)
    return str(root)


# --- image folder -----------------------------------------------------------------------------------------------
def _png_claiming(w: int, h: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def imagefolder_claiming(d: Path, n: int = 40) -> str:
    """n PNGs of ~100 bytes each claiming 9000 x 9000 pixels (81 Mpx: under Pillow's bomb limit)."""
    root = d / "imgs-claim"
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(n // 2):
            (root / "train" / c / f"{i}.png").write_bytes(_png_claiming(9000, 9000))
    return str(root)


# --- CIFAR pickles ------------------------------------------------------------------------------------------------
def _cifar_with_meta(d: Path, name: str, meta: bytes) -> str:
    root = d / name
    save_dataset(make_synthetic(n=10, size=32, channels=3, classes=2, seed=0), root, "cifar10")
    (root / "batches.meta").write_bytes(meta)
    return str(root)


def cifar_label_names_not_list(d: Path) -> str:
    return _cifar_with_meta(d, "cifar-names", pickle.dumps({b"label_names": 7}, 2))


def cifar_reconstruct_bomb(d: Path) -> str:
    """numpy's _reconstruct called with a shape of 10**10 (10 GB) instead of numpy's (0,)."""
    p = (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
         b"\x8a\x05\x00\xe4\x0bT\x02\x85C\x01b\x87R.")  # LONG1 10**10, TUPLE1, SHORT_BINBYTES b"b", TUPLE3, REDUCE
    return _cifar_with_meta(d, "cifar-reconstruct", p)


def cifar_bytes_bomb(d: Path) -> str:
    """bytes(2**31 - 1): a 2 GiB allocation from 30 bytes."""
    return _cifar_with_meta(d, "cifar-bytes", b"\x80\x02c__builtin__\nbytes\nJ\xff\xff\xff\x7f\x85R.")


def cifar_memo_bomb(d: Path) -> str:
    """LONG_BINPUT 2**30: the C unpickler would size (and clear) a 16 GiB memo table."""
    return _cifar_with_meta(d, "cifar-memo", b"\x80\x02]r\x00\x00\x00\x40.")


def cifar_hash_bomb(d: Path, depth: int = 60) -> str:
    """A dict keyed by a shared nested tuple 60 levels deep: hashing it takes 2**60 steps."""
    ops = [b"\x80\x02)q\x00"]  # PROTO 2, EMPTY_TUPLE, BINPUT 0
    for i in range(1, depth + 1):
        ops.append(b"h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"\x86q" + bytes([i]))  # GET GET TUPLE2 PUT
    ops.append(b"}h" + bytes([depth]) + b"Ns.")  # EMPTY_DICT, GET, NONE, SETITEM, STOP
    return _cifar_with_meta(d, "cifar-hash", b"".join(ops))


# --- SVHN .mat ------------------------------------------------------------------------------------------------------
def _mat_header() -> bytes:
    text = b"MATLAB 5.0 MAT-file, hostile test".ljust(116, b" ")
    return text + b"\x00" * 8 + struct.pack("<H", 0x0100) + b"IM"


def svhn_compressed_claim(d: Path) -> str:
    """A compressed variable whose inner matrix tag claims 2 GiB: scipy would allocate it before reading."""
    root = d / "svhn-claim"
    root.mkdir()
    inner = struct.pack("<II", 14, 2**31) + b"\x00" * 64
    comp = zlib.compress(inner)
    (root / "train_32x32.mat").write_bytes(_mat_header() + struct.pack("<II", 15, len(comp)) + comp)
    return str(root)


def svhn_element_claim(d: Path) -> str:
    root = d / "svhn-elem"
    root.mkdir()
    (root / "train_32x32.mat").write_bytes(_mat_header() + struct.pack("<II", 14, 2**31 - 8) + b"\x00" * 64)
    return str(root)


# --- other ----------------------------------------------------------------------------------------------------------
class Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("this must never run",))


def pickled_pt(d: Path) -> str:
    import torch

    p = d / "pickled.pt"
    torch.save({"delta": Payload()}, p)
    return str(p)


def classes_json_bomb(d: Path) -> str:
    root = d / "npy-json"
    save_dataset(make_synthetic(n=8, size=8, channels=1, classes=2), root, "npy")
    (root / "classes.json").write_text("[" * 100000 + "]" * 100000)
    return str(root)


#: name -> builder, every one of which must end in one line and exit 2 with bounded memory
CLAIMS_HUGE: dict[str, Callable[[Path], str]] = {
    "npz: header claims 10^9 images": npz_claiming_billion_images,
    "npz: zip entry claims 4 GiB": npz_lying_zip_size,
    "npz: one label of 10^12, no names": npz_huge_label,
    "idx: raw header claims 10^9 images": idx_raw_claiming_billion,
    "idx: .gz claims 784 MB from 100 B": idx_gz_claiming_beyond_deflate,
    "idx: .gz inflates to 64 MB past header": idx_gz_trailing_bomb,
    "npy: header claims 10^9 images": npy_claiming_billion,
    "npy: labels claim 10^10": npy_labels_claiming,
    "imagefolder: 40 PNGs claim 9000x9000": imagefolder_claiming,
    "cifar: _reconstruct of 10^10": cifar_reconstruct_bomb,
    "cifar: bytes(2^31)": cifar_bytes_bomb,
    "cifar: memo index 2^30": cifar_memo_bomb,
    "cifar: hash of a 2^60 tuple": cifar_hash_bomb,
    "svhn: compressed var claims 2 GiB": svhn_compressed_claim,
    "svhn: element claims 2 GiB": svhn_element_claim,
}

#: malformed inputs that once printed a traceback or were quietly accepted: one line, exit 2
MALFORMED: dict[str, Callable[[Path], str]] = {
    "npz: 0-d labels": npz_0d_labels,
    "npz: duplicate class names": npz_duplicate_classes,
    "npz: escape sequences in class names": npz_escape_classes,
    "npz: object arrays": npz_object_arrays,
    "idx: float labels with NaN": idx_float_nan_labels,
    "cifar: label_names not a list": cifar_label_names_not_list,
    "npy: classes.json nested 10^5 deep": classes_json_bomb,
}
