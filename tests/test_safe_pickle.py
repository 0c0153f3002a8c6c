"""Untrusted pickles: a payload that would run a command is refused, and nothing runs."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from unpoison.data import load_dataset
from unpoison.data._safe_pickle import safe_load
from unpoison.errors import UserError


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _write_evil_cifar(root: Path, marker: Path, where: str) -> None:
    root.mkdir(parents=True)
    batch = {b"batch_label": b"x", b"labels": [0], b"data": np.zeros((1, 3072), np.uint8), b"filenames": [b"a"]}
    for i in range(1, 6):
        with open(root / f"data_batch_{i}", "wb") as f:
            d = {**batch, b"evil": _Evil(marker)} if where == f"data_batch_{i}" else batch
            pickle.dump(d, f, 2)
    meta = {b"label_names": [b"a"], b"num_cases_per_batch": 1, b"num_vis": 3072}
    if where == "batches.meta":
        meta[b"evil"] = _Evil(marker)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump(meta, f, 2)


@pytest.mark.parametrize("where", ["batches.meta", "data_batch_3"])
def test_command_payload_is_refused(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "PWNED"
    _write_evil_cifar(tmp_path / "cifar-10-batches-py", marker, where)
    with pytest.raises(UserError, match=f"{where}: unsafe or corrupt pickle: refusing to load (posix|os).system"):
        load_dataset(tmp_path / "cifar-10-batches-py")
    assert not marker.exists()


def test_cli_refuses_payload(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    marker = tmp_path / "PWNED"
    _write_evil_cifar(tmp_path / "c", marker, "batches.meta")
    rc, out, err = run_cli("info", tmp_path / "c")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "batches.meta" in err
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    b"cbuiltins\neval\n(S'1+1'\ntR.",            # builtins other than plain containers
    b"csubprocess\ncall\n(S'true'\ntR.",         # any other module
    b"cnumpy\nload\n(S'x'\ntR.",                  # numpy, but not array reconstruction
])
def test_other_globals_are_refused(tmp_path: Path, payload: bytes) -> None:
    p = tmp_path / "p.pkl"
    p.write_bytes(payload)
    with pytest.raises(UserError, match="refusing to load"):
        safe_load(p)


def test_truncated_pickle_is_user_error(tmp_path: Path) -> None:
    p = tmp_path / "t.pkl"
    p.write_bytes(pickle.dumps({b"data": np.arange(100, dtype=np.uint8)}, protocol=2)[:-30])
    with pytest.raises(UserError, match="t.pkl"):
        safe_load(p)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_plain_data_loads_with_every_protocol(tmp_path: Path, protocol: int) -> None:
    obj = {b"data": np.arange(12, dtype=np.uint8).reshape(3, 4), b"labels": [1, 2, 3], "s": ("a", 1.5, None)}
    p = tmp_path / "ok.pkl"
    p.write_bytes(pickle.dumps(obj, protocol=protocol))
    back = safe_load(p)
    np.testing.assert_array_equal(back[b"data"], obj[b"data"])
    assert back[b"labels"] == [1, 2, 3] and back["s"] == ("a", 1.5, None)
