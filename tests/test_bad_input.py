"""Bad input through the CLI: exit code 2, one line on stderr naming the file, nothing written."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unpoison.data import make_synthetic, save_dataset


def _image_tree(root: Path, classes: dict[str, dict[str, int]]) -> None:
    """classes: split -> {class: number of 8x8 gray PNGs}."""
    rng = np.random.default_rng(0)
    for split, per in classes.items():
        for cls, n in per.items():
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(d / f"{i}.png")


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    ds = make_synthetic(n=16, size=8, channels=1, classes=2, seed=0)
    base = {"x_train": ds.x_train, "y_train": ds.y_train, "x_test": ds.x_test, "y_test": ds.y_test}
    base.update(arrays)
    np.savez(path, **base)
    return path


def _assert_refused(run_cli, out_dir: Path, data: object, names: str, command: str = "evaluate") -> str:  # type: ignore[no-untyped-def]
    """Run a writing command on ``data``; check the refusal and that ``out_dir`` stays empty."""
    if command == "evaluate":
        argv = ["evaluate", data, "--out", out_dir / "result.json", "--preset", "smoke", "--device", "cpu", "--quiet"]
    else:
        argv = ["purify", data, out_dir / "purified", "--method", "median", "--device", "cpu", "--quiet"]
    rc, out, err = run_cli(*argv)
    lines = err.strip().splitlines()
    assert rc == 2, (out, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert names in lines[0], lines[0]
    assert list(out_dir.iterdir()) == []
    return lines[0]


def test_missing_path(tmp_path: Path, out_dir: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    msg = _assert_refused(run_cli, out_dir, tmp_path / "nope.npz", "nope.npz")
    assert "no such file" in msg


def test_missing_path_with_format_prefix(tmp_path: Path, out_dir: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    _assert_refused(run_cli, out_dir, f"cifar10:{tmp_path / 'gone'}", "gone", command="purify")


def test_unknown_format_file(tmp_path: Path, out_dir: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "data.txt").write_text("hello")
    msg = _assert_refused(run_cli, out_dir, tmp_path / "data.txt", "data.txt")
    assert "unknown dataset format" in msg


def test_unknown_format_prefix(tmp_path: Path, out_dir: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    msg = _assert_refused(run_cli, out_dir, f"tiff:{tmp_path}", "tiff")
    assert "unknown dataset format" in msg


def test_wrong_dtype(tmp_path: Path, out_dir: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    p = _npz(tmp_path / "f.npz", x_train=np.zeros((16, 8, 8, 1), np.float32))
    assert "uint8" in _assert_refused(run_cli, out_dir, p, "f.npz")


def test_wrong_shape(tmp_path: Path, out_dir: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    p = _npz(tmp_path / "s.npz", x_train=np.zeros((16, 8, 8, 2), np.uint8))
    assert "shape" in _assert_refused(run_cli, out_dir, p, "s.npz", command="purify")


def test_label_count_mismatch(tmp_path: Path, out_dir: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    p = _npz(tmp_path / "n.npz", y_train=np.zeros(15, np.int64))
    assert "16 images but 15 labels" in _assert_refused(run_cli, out_dir, p, "n.npz")


def test_labels_out_of_range(tmp_path: Path, out_dir: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    y = np.arange(16) % 2
    y[3] = 7
    p = _npz(tmp_path / "r.npz", y_train=y, classes=np.array(["a", "b"]))
    assert "out of range" in _assert_refused(run_cli, out_dir, p, "r.npz")


def test_negative_labels(tmp_path: Path, out_dir: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    y = np.arange(16) % 2
    y[0] = -1
    assert "out of range" in _assert_refused(run_cli, out_dir, _npz(tmp_path / "g.npz", y_train=y), "g.npz")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_image(tmp_path: Path, out_dir: Path, run_cli, damage: str) -> None:  # type: ignore[no-untyped-def]
    _image_tree(tmp_path / "d", {"train": {"a": 2, "b": 2}})
    bad = tmp_path / "d" / "train" / "b" / "1.png"
    big = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(big).save(bad)
    raw = bad.read_bytes()
    bad.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"\x89PNG not really" + raw[40:80])
    msg = _assert_refused(run_cli, out_dir, tmp_path / "d", "b/1.png", command="purify")
    assert "image" in msg


def test_empty_class(tmp_path: Path, out_dir: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    _image_tree(tmp_path / "d", {"train": {"a": 2, "b": 2}})
    (tmp_path / "d" / "train" / "c").mkdir()
    assert "no images" in _assert_refused(run_cli, out_dir, tmp_path / "d", "train/c")


def test_empty_class_in_npz(tmp_path: Path, out_dir: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    p = _npz(tmp_path / "e.npz", classes=np.array(["a", "b", "c"]))
    assert "no training image: c" in _assert_refused(run_cli, out_dir, p, "e.npz")


def test_test_classes_differ(tmp_path: Path, out_dir: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    _image_tree(tmp_path / "d", {"train": {"a": 2, "b": 2}, "test": {"a": 1, "c": 1}})
    msg = _assert_refused(run_cli, out_dir, tmp_path / "d", "d/test")
    assert "differ" in msg and "'c'" in msg


def test_cifar_with_wrong_array(tmp_path: Path, out_dir: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    save_dataset(make_synthetic(n=10, size=32, channels=3, classes=2), tmp_path / "c", "cifar10")
    with open(tmp_path / "c" / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, 2)
    assert "3072" in _assert_refused(run_cli, out_dir, tmp_path / "c", "data_batch_2")


def test_info_reports_one_line(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    rc, out, err = run_cli("info", tmp_path / "missing")
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and "missing" in err


def test_info_describes_a_good_dataset(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    save_dataset(make_synthetic(n=16, size=8, channels=1, classes=2), tmp_path / "ok", "npy")
    rc, out, err = run_cli("info", tmp_path / "ok")
    assert rc == 0 and "format:   npy" in out and "mmap=True" in out
