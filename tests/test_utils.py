"""The shared machinery: registry, atomic writes, fraction parsing, PSNR, device choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unpoison._registry import Registry
from unpoison.errors import UserError
from unpoison.outputs import atomic_path, write_marker
from unpoison.tensors import pick_device
from unpoison.utils import parse_fraction, psnr


def test_registry_unknown_name_lists_known() -> None:
    reg: Registry[int] = Registry("thing")
    reg.register("a", "first")(1)
    assert reg.get("A") == 1 and reg.names() == ["a"] and reg.help("a") == "first"
    with pytest.raises(UserError, match="unknown thing 'b'; known: a"):
        reg.get("b")
    with pytest.raises(RuntimeError):
        reg.register("a")(2)


def test_atomic_path_keeps_old_content_on_crash(tmp_path) -> None:
    final = tmp_path / "out.txt"
    final.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert final.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temporary left behind
    with atomic_path(final) as tmp:
        tmp.write_text("new")
    assert final.read_text() == "new"


def test_atomic_dir_swap(tmp_path) -> None:
    final = tmp_path / "ds"
    with atomic_path(final, is_dir=True) as tmp:
        tmp.mkdir()
        (tmp / "a").write_text("1")
    with pytest.raises(UserError, match="not written by unpoison"), atomic_path(final, is_dir=True) as tmp:
        tmp.mkdir()  # an unmarked folder is never replaced
    assert sorted(p.name for p in final.iterdir()) == ["a"]
    write_marker(final, "test")
    with atomic_path(final, is_dir=True) as tmp:
        tmp.mkdir()
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


@pytest.mark.parametrize("text,val", [("8/255", 8 / 255), ("0.5", 0.5), (1, 1.0), (" 16/255 ", 16 / 255)])
def test_parse_fraction(text, val) -> None:
    assert parse_fraction(text) == pytest.approx(val)


@pytest.mark.parametrize("text", ["abc", "1/0", "8/", ""])
def test_parse_fraction_rejects(text) -> None:
    with pytest.raises(UserError):
        parse_fraction(text, "eps")


def test_psnr_known_value() -> None:
    a = np.zeros((2, 4, 4, 1), np.uint8)
    b = a.copy()
    b[...] = 255 // 10  # mse = (25/255)^2
    expected = 10 * np.log10(1 / (25 / 255) ** 2)
    assert psnr(a, b) == pytest.approx(expected)
    assert psnr(torch.zeros(3), torch.zeros(3)) == float("inf")


def test_pick_device() -> None:
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA"):
            pick_device("cuda")
