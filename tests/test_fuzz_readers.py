"""Fuzzing the NPZ and IDX readers (hypothesis): any bytes in, a dataset or one UserError out, memory bounded.

Three kinds of input per reader: arbitrary bytes, a valid file with random edits (bit flips, 32-bit
fields set to extremes, digits of the header rewritten, truncation, insertion), and well-formed
containers (correct CRCs) whose headers make arbitrary claims, so the checks behind the container's
own integrity checks are reached too. Kept within CI's budget: 150 examples a property, no deadline.
"""

from __future__ import annotations

import gzip
import io
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unpoison.data import ImageDataset, load_dataset, make_synthetic
from unpoison.errors import UserError

#: inputs are at most a few KiB; honest data from them is < 3 MiB (deflate's ratio), claims are refused
PEAK_LIMIT = 48 << 20
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

_CLAIMS = st.sampled_from([0, 1, 2, 3, 8, 28, 255, 256, 65535, 2**31 - 1, 2**32 - 1, 10**9])


def _npy(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


def _valid_npz() -> bytes:
    ds = make_synthetic(n=8, size=8, channels=1, classes=2, seed=0)
    b = io.BytesIO()
    np.savez(b, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test,
             classes=np.array(ds.classes))
    return b.getvalue()


def _valid_idx_images() -> bytes:
    return bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (8, 6, 6)) + bytes(i % 251 for i in range(288))


@st.composite
def _mutated(draw: st.DrawFn, base: bytes) -> bytes:
    b = bytearray(base)
    for _ in range(draw(st.integers(1, 6))):
        if not b:
            break
        i = draw(st.integers(0, len(b) - 1))
        op = draw(st.sampled_from(["flip", "field", "digits", "truncate", "insert"]))
        if op == "flip":
            b[i] ^= draw(st.integers(1, 255))
        elif op == "field":
            b[i:i + 4] = draw(_CLAIMS).to_bytes(4, draw(st.sampled_from(["big", "little"])))
        elif op == "digits":
            digits = [j for j, c in enumerate(b) if 48 <= c <= 57]
            if digits:
                j = digits[draw(st.integers(0, len(digits) - 1))]
                b[j:j + 1] = str(draw(_CLAIMS)).encode()
        elif op == "truncate":
            del b[i:]
        else:
            b[i:i] = draw(st.binary(min_size=1, max_size=16))
    return bytes(b)


@st.composite
def _claiming_npz(draw: st.DrawFn) -> bytes:
    """A zip with correct CRCs whose .npy headers claim any shape/dtype, followed by any amount of data."""
    out = io.BytesIO()
    method = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
    with zipfile.ZipFile(out, "w", method) as z:
        for key in draw(st.lists(st.sampled_from(["x_train", "y_train", "x_test", "y_test", "classes"]),
                                 min_size=1, max_size=5, unique=True)):
            shape = tuple(draw(st.lists(_CLAIMS, min_size=0, max_size=4)))
            dtype = draw(st.sampled_from(["|u1", "<i8", "<f4", "<U3", "|b1", ">i2", "<f8"]))
            head = io.BytesIO()
            np.lib.format.write_array_header_1_0(head, {"descr": dtype, "fortran_order": False, "shape": shape})
            z.writestr(f"{key}.npy", head.getvalue() + draw(st.binary(max_size=600)))
    return out.getvalue()


@st.composite
def _claiming_idx(draw: st.DrawFn) -> bytes:
    code = draw(st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x07]))
    dims = draw(st.lists(_CLAIMS, min_size=0, max_size=4))
    return bytes([0, 0, code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims) + \
        draw(st.binary(max_size=600))


def _outcome(spec: str) -> None:
    """Load ``spec`` under tracemalloc: a validated dataset or a one-line UserError, memory bounded."""
    tracemalloc.start()
    try:
        try:
            ds = load_dataset(spec)
            assert isinstance(ds, ImageDataset) and ds.x_train.dtype == np.uint8
        except UserError as e:
            assert "\n" not in str(e)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < PEAK_LIMIT, f"peak {peak >> 20} MiB"


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@FUZZ
@given(data=st.one_of(st.binary(max_size=2048), _mutated(_valid_npz()), _claiming_npz()))
def test_npz_reader_any_bytes(fuzz_dir: Path, data: bytes) -> None:
    p = fuzz_dir / "f.npz"
    p.write_bytes(data)
    _outcome(f"npz:{p}")


@FUZZ
@given(data=st.one_of(st.binary(max_size=1024), _mutated(_valid_idx_images()), _claiming_idx()),
       gz=st.booleans(), which=st.sampled_from(["images", "labels"]))
def test_idx_reader_any_bytes(fuzz_dir: Path, data: bytes, gz: bool, which: str) -> None:
    root = fuzz_dir / "idx"
    root.mkdir(exist_ok=True)
    for f in root.iterdir():
        f.unlink()
    labels = bytes([0, 0, 8, 1, 0, 0, 0, 8]) + bytes([0, 1] * 4)
    files = {"train-images-idx3-ubyte": data if which == "images" else _valid_idx_images(),
             "train-labels-idx1-ubyte": data if which == "labels" else labels}
    for name, content in files.items():
        if gz:
            (root / (name + ".gz")).write_bytes(gzip.compress(content))
        else:
            (root / name).write_bytes(content)
    _outcome(f"idx:{root}")
    if gz and which == "images":  # the raw bytes as a (corrupt) .gz, too
        (root / "train-images-idx3-ubyte.gz").write_bytes(data)
        _outcome(f"idx:{root}")


def test_fuzz_bases_are_valid(fuzz_dir: Path) -> None:
    """The mutated bases load (so mutations start from real files, not from something already refused)."""
    (fuzz_dir / "ok.npz").write_bytes(_valid_npz())
    assert load_dataset(f"npz:{fuzz_dir / 'ok.npz'}").x_train.shape == (8, 8, 8, 1)
    root = fuzz_dir / "okidx"
    root.mkdir()
    (root / "train-images-idx3-ubyte").write_bytes(_valid_idx_images())
    (root / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 8]) + bytes([0, 1] * 4))
    assert load_dataset(f"idx:{root}").x_train.shape == (8, 6, 6, 1)


# --- the other parsers of untrusted bytes (fewer examples: the CIFAR/SVHN checks have their own tests) -------
SMALL_FUZZ = settings(FUZZ, max_examples=60)


@pytest.fixture(scope="module")
def cifar_base(fuzz_dir: Path) -> tuple[Path, bytes, bytes]:
    from unpoison.data import save_dataset

    root = fuzz_dir / "cifar"
    save_dataset(make_synthetic(n=10, size=32, channels=3, classes=2, seed=0), root, "cifar10")
    return root, (root / "batches.meta").read_bytes(), (root / "data_batch_1").read_bytes()


def _mat_bytes(compressed: bool) -> bytes:
    import scipy.io

    ds = make_synthetic(n=4, size=32, channels=3, classes=3, seed=0)
    b = io.BytesIO()
    scipy.io.savemat(b, {"X": ds.x_train.transpose(1, 2, 3, 0), "y": (ds.y_train + 1).astype(np.uint8)[:, None]},
                     do_compression=compressed)
    return b.getvalue()


@SMALL_FUZZ
@given(data=st.data(), which=st.sampled_from(["batches.meta", "data_batch_1"]))
def test_cifar_reader_any_bytes(cifar_base: tuple[Path, bytes, bytes], data: st.DataObject, which: str) -> None:
    root, meta, batch = cifar_base
    base = meta if which == "batches.meta" else batch
    blob = data.draw(st.one_of(_mutated(base), st.binary(max_size=512)))
    (root / "batches.meta").write_bytes(meta)
    (root / "data_batch_1").write_bytes(batch)
    (root / which).write_bytes(blob)
    _outcome(f"cifar10:{root}")


@SMALL_FUZZ
@given(data=st.one_of(_mutated(_mat_bytes(False)), _mutated(_mat_bytes(True)), st.binary(max_size=512)))
def test_svhn_reader_any_bytes(fuzz_dir: Path, data: bytes) -> None:
    root = fuzz_dir / "svhn"
    root.mkdir(exist_ok=True)
    (root / "train_32x32.mat").write_bytes(data)
    _outcome(f"svhn:{root}")
