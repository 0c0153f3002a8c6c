"""The ``icons`` RGB set: converter on a tiny fake theme package, split hygiene, name resolution.

The Debian fetch itself is never run here; the trees are written by the tests in the real layout
(``<pkg>/usr/share/icons/<theme>/<size>/<category>/<name>.png``, RGBA, symlink aliases).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unpoison.data import icons, load_dataset
from unpoison.data.fetch import main as fetch_main
from unpoison.errors import UserError

FOLDERS = {"actions": "actions", "apps": "apps", "devices": "devices", "mimetypes": "mimes", "places": "places",
           "status": "status"}


def _drawing(seed: int, side: int) -> Image.Image:
    """A distinct RGBA icon: a random 8x8 colour pattern, upscaled, on a transparent border."""
    rng = np.random.default_rng(seed)
    a = np.zeros((side, side, 4), np.uint8)
    core = np.repeat(np.repeat(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), side // 8, 0), side // 8, 1)
    m = side // 8
    a[m:side - m, m:side - m, :3] = core[m:side - m, m:side - m]
    a[m:side - m, m:side - m, 3] = 255
    return Image.fromarray(a, "RGBA")


def _theme(root: Path, pkg: str = "fake-icon-theme", theme: str = "Fake", names: int = 6,
           sizes: tuple[int, ...] = (32, 64), seed: int = 0) -> Path:
    """A package tree: ``names`` icons per class at ``sizes``, plus things the converter must skip."""
    base = root / pkg / "usr/share/icons" / theme
    for ci, (label, folder) in enumerate(sorted(FOLDERS.items())):
        for n in range(names):
            for side in sizes:
                d = base / f"{side}x{side}" / folder
                d.mkdir(parents=True, exist_ok=True)
                # one drawing per item (all sizes from one pattern: the variants are near-copies)
                img = _drawing(seed * 10_000 + ci * 100 + n, 64).resize((side, side), Image.Resampling.NEAREST)
                img.save(d / f"{label}-item{n}.png")
    small = base / "16x16/apps"
    small.mkdir(parents=True)
    _drawing(999, 16).save(small / "tiny.png")  # under 32 px: skipped
    os.symlink(base / "32x32/apps/apps-item0.png", base / "32x32/apps/alias.png")  # alias: skipped
    (base / "32x32/emotes").mkdir()
    _drawing(998, 32).save(base / "32x32/emotes/face.png")  # not a class folder: skipped
    return root / pkg


def test_convert_tiny_tree(tmp_path: Path) -> None:
    root = _theme(tmp_path)
    ds, man = icons.convert([root], seed=0, progress=False)
    assert ds.classes == list(icons.CLASSES) == sorted(FOLDERS)
    assert ds.x_train.shape[1:] == (32, 32, 3) and ds.x_train.dtype == np.uint8
    # 6 items x 2 sizes per class; the two sizes of an item are one group and land together
    assert len(ds.y_train) + len(ds.y_test) == 6 * 6 * 2
    assert np.bincount(ds.y_train, minlength=6).min() > 0 and np.bincount(ds.y_test, minlength=6).min() > 0
    assert man["skipped"]["symlink"] == 1 and man["skipped"]["smaller than 32 px"] == 1
    assert man["skipped"]["other folder"] == 1
    train_items = {Path(f).stem for f in man["files"]["train"]}
    test_items = {Path(f).stem for f in man["files"]["test"]}
    assert train_items and test_items and not train_items & test_items
    # the manifest names the source of every row, in row order
    for split, x in (("train", ds.x_train), ("test", ds.x_test)):
        for i in (0, len(x) - 1):
            np.testing.assert_array_equal(x[i], icons.to_rgb32(tmp_path / man["files"][split][i]))
    # the per-class counts in the manifest are those of the arrays
    assert man["counts"]["apps"]["train"] == int((ds.y_train == icons.CLASSES.index("apps")).sum())


def test_alpha_is_composited_on_mid_grey(tmp_path: Path) -> None:
    a = np.zeros((64, 48, 4), np.uint8)  # not square: padded with the background
    a[:, :24] = (255, 0, 0, 255)  # left half opaque red, right half transparent
    p = tmp_path / "half.png"
    Image.fromarray(a, "RGBA").save(p)
    out = icons.to_rgb32(p)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    # 48 wide -> 8 px of padding a side -> 4 px at 32; Lanczos reaches 3 output px across an edge
    assert (out[:, :1] == 128).all() and (out[:, -1:] == 128).all()  # padding
    assert (out[8:24, 20:25] == 128).all()  # transparent pixels take the background exactly
    red = out[8:24, 8:13]
    assert (red[..., 0] > 240).all() and (red[..., 1:] < 15).all()


def test_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    root = _theme(tmp_path, names=12, sizes=(32, 48, 128))
    a, ma = icons.convert([root], seed=3, progress=False)
    b, mb = icons.convert([root], seed=3, progress=False)
    assert ma["files"] == mb["files"]
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    c, mc = icons.convert([root], seed=4, progress=False)
    assert mc["files"]["test"] != ma["files"]["test"]  # the seed matters

    def digests(x: np.ndarray) -> set[str]:
        return {hashlib.sha256(im.tobytes()).hexdigest() for im in x}

    assert not digests(a.x_train) & digests(a.x_test)
    # test holds about a sixth of every class
    for k in range(6):
        n_te, n_all = (a.y_test == k).sum(), (a.y_test == k).sum() + (a.y_train == k).sum()
        assert 0.08 <= n_te / n_all <= 0.25


def test_class_mapping_does_not_depend_on_what_is_found(tmp_path: Path) -> None:
    """A tree without some classes keeps the fixed class order (label k always means CLASSES[k])."""
    root = _theme(tmp_path, names=3)
    for side in (32, 64):
        for p in (root / f"usr/share/icons/Fake/{side}x{side}/actions").iterdir():
            p.unlink()
    ds, _ = icons.convert([root], seed=0, progress=False)
    assert ds.classes == list(icons.CLASSES)
    assert icons.CLASSES.index("actions") not in set(ds.y_train.tolist()) | set(ds.y_test.tolist())
    assert {icons.CLASSES.index("mimetypes")} <= set(ds.y_train.tolist()) | set(ds.y_test.tolist())


def test_near_copies_and_shared_images(tmp_path: Path) -> None:
    """Renamed near-copies stay in one split; one image in two classes is dropped; exact copies kept once."""
    root = _theme(tmp_path, names=8, sizes=(32,))
    base = root / "usr/share/icons/Fake/32x32"
    img = np.asarray(Image.open(base / "apps/apps-item0.png")).copy()
    img[10, 10, :3] ^= 1  # a one-pixel change: a near copy under another name
    Image.fromarray(img, "RGBA").save(base / "apps/renamed-copy.png")
    Image.open(base / "places/places-item0.png").save(base / "devices/shared.png")  # in two classes
    Image.open(base / "status/status-item0.png").save(base / "status/status-dup.png")  # exact copy
    for seed in range(4):
        ds, man = icons.convert([root], seed=seed, progress=False)
        sides = {split: {Path(f).stem for f in man["files"][split]} for split in ("train", "test")}
        a_split = "train" if "apps-item0" in sides["train"] else "test"
        assert "renamed-copy" in sides[a_split]
        assert "shared" not in sides["train"] | sides["test"]
        assert "places-item0" not in sides["train"] | sides["test"]
        assert len({"status-item0", "status-dup"} & (sides["train"] | sides["test"])) == 1
    assert man["skipped"]["exact duplicate across classes"] == 2
    assert man["skipped"]["exact duplicate (same class)"] == 1


def test_corrupt_and_oversized_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _theme(tmp_path, names=2, sizes=(32,))
    big = root / "usr/share/icons/Fake/1100x1100/apps"
    big.mkdir(parents=True)
    Image.new("RGBA", (1100, 40)).save(big / "huge.png")
    _, man = icons.convert([root], progress=False)
    assert man["skipped"]["image too large"] == 1
    bad = root / "usr/share/icons/Fake/32x32/apps/broken.png"
    good = (root / "usr/share/icons/Fake/32x32/apps/apps-item0.png").read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(UserError, match="broken.png"):
        icons.convert([root], progress=False)
    out = tmp_path / "o.npz"
    assert fetch_main(["icons", "convert", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "broken.png" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not a png at all")
    with pytest.raises(UserError, match="broken.png"):
        icons.convert([root], progress=False)
    with pytest.raises(UserError, match="not found"):
        icons.convert([tmp_path / "missing"], progress=False)


def test_write_then_resolve_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    run_cli, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("UNPOISON_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(icons, "cache_dirs", lambda: [tmp_path / "data" / "icons", tmp_path / "home/.cache/icons"])
    # missing: one line saying how to get it, exit 2
    with pytest.raises(UserError, match="make rgb-data"):
        load_dataset("icons")
    rc, out, err = run_cli("info", "icons")
    assert rc == 2 and "make rgb-data" in err and len(err.strip().splitlines()) == 1
    # present: found by name, and by icons:PATH
    root = _theme(tmp_path / "src", names=3)
    assert fetch_main(["icons", "convert", str(root)]) == 0
    capsys.readouterr()
    target = tmp_path / "data/icons/icons.npz"
    assert target.is_file()
    man = json.loads(target.with_suffix(".json").read_text())
    assert man["shape"]["train"][1:] == [32, 32, 3] and len(man["sha256"]) == 64
    ds = load_dataset("icons")
    assert ds.classes == list(icons.CLASSES) and ds.has_test
    assert man["content_fingerprint"] and man["seed"] == 0
    ds2 = load_dataset(f"icons:{target}")
    np.testing.assert_array_equal(ds.x_test, ds2.x_test)
    rc, out, err = run_cli("info", "icons")
    assert rc == 0 and "32x32x3" in out
    # an existing file is refused without --overwrite (nothing is destroyed)
    assert fetch_main(["icons", "convert", str(root)]) == 2


def test_fetch_without_apt_says_how(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(icons.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="make rgb-data"):
        icons.fetch(tmp_path / "src")
    assert not (tmp_path / "src").exists()


def test_merge_near_rules() -> None:
    """Same family: near variants (RMS < 10) join; across families only copies (RMS < 4); across classes drop."""
    rng = np.random.default_rng(0)
    base = rng.integers(40, 200, (32, 32, 3)).astype(np.int16)
    far = rng.integers(40, 200, (32, 32, 3)).astype(np.uint8)

    def shifted(rms: float) -> np.ndarray:  # a uniform shift of ``rms`` gives exactly that RMS difference
        return (base + int(rms)).astype(np.uint8)

    imgs = np.stack([base.astype(np.uint8), shifted(6), shifted(2), far])
    assert icons._rms(imgs[0], imgs[1]) == 6.0 and icons._rms(imgs[0], imgs[2]) == 2.0
    y = np.zeros(4, dtype=np.int64)
    g, keep = icons.merge_near(imgs, y, ["a/apps/x", "a/apps/y", "b/apps/z", "a/apps/w"])
    assert g[0] == g[1] == g[2] and g[3] != g[0] and keep.all()  # same family at 6; other family at 2
    g, keep = icons.merge_near(imgs[:2], y[:2], ["a/apps/x", "b/apps/y"])
    assert g[0] != g[1] and keep.all()  # other family at 6: independent drawings, not merged
    g, keep = icons.merge_near(imgs[[0, 2]], np.array([0, 1]), ["a/apps/x", "a/places/y"])
    assert not keep.any()  # one drawing in two classes: ambiguous, both dropped
    g, keep = icons.merge_near(imgs[:2], np.array([0, 1]), ["a/apps/x", "a/places/y"])
    assert keep.all() and g[0] != g[1]
    assert icons.family("mate") == icons.family("gnome") == icons.family("Tango") != icons.family("oxygen")
