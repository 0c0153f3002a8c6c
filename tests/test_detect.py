"""Poisoned-sample detection: the stage-1 p_hat rule, the CSV, and bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from unpoison.data import make_synthetic, save_dataset
from unpoison.defenses.base import DEFENSES, Purifier
from unpoison.detect import detect_poison
from unpoison.tags import Tags
from unpoison.train import TrainConfig

#: one flat colour shift per class: a shortcut a tiny CNN learns in a few steps
_PATTERNS = np.broadcast_to(np.array([[40, -40, 40], [-40, 40, -40], [40, 40, -40], [-40, -40, 40]], np.float32)
                            [:, None, None, :], (4, 8, 8, 3)).copy()


if "test-oracle" not in DEFENSES:
    @DEFENSES.register("test-oracle", "a perfect stage 1: p_hat = the class-wise poison pattern")
    class Oracle(Purifier):
        name = "test-oracle"
        tags = Tags(labels=True, p_hat="extras")

        def _transform(self, x: np.ndarray, y: np.ndarray | None) -> np.ndarray:
            self.extras_ = {"p_hat": _PATTERNS[y].astype(np.float16)}  # 0..255 pixel units
            return x


def _half_poisoned() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ds = make_synthetic(n=192, size=8, channels=3, classes=4, seed=0, signal=4)
    x = ds.x_train.astype(np.float32)
    poisoned = np.zeros(len(x), dtype=bool)
    poisoned[::2] = True
    x[poisoned] += _PATTERNS[ds.y_train[poisoned]]
    return np.clip(np.rint(x), 0, 255).astype(np.uint8), ds.y_train, poisoned


def test_detection_flags_the_samples_carrying_the_shortcut() -> None:
    x, y, truth = _half_poisoned()
    cfg = TrainConfig.preset("smoke", epochs=10, batch_size=32, crop_pad=0, flip=False)
    res = detect_poison(x, y, purifier="test-oracle", train_config=cfg, device="cpu", progress=False)
    assert res.scores.shape == (len(x),) and res.flags.dtype == bool
    assert np.all((res.scores >= 0) & (res.scores <= 1))
    recall = (res.flags & truth).sum() / truth.sum()
    assert recall >= 0.9
    assert res.scores[truth].mean() > res.scores[~truth].mean() + 0.2
    assert res.info["n_flagged"] == int(res.flags.sum())


def test_cli_writes_csv_and_manifest(tmp_path: Path) -> None:
    from unpoison.cli import main
    from unpoison.data import ImageDataset

    x, y, _ = _half_poisoned()
    data = save_dataset(ImageDataset(x, y, x[:32], y[:32]), tmp_path / "p.npz")
    out = tmp_path / "scores.csv"
    assert main(["detect", str(data), str(out), "--method", "dvae",
                 "--detector", "test-oracle", "--preset", "smoke", "--epochs", "1",
                 "--device", "cpu", "--quiet"]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(x) and set(rows[0]) == {"index", "label", "score", "flag"}
    assert {r["flag"] for r in rows} <= {"0", "1"}
    man = json.loads(Path(str(out) + ".json").read_text())
    assert man["command"] == "detect" and man["seed"] == 0


def test_bad_input_exit_2_nothing_written(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from unpoison.cli import main

    out = tmp_path / "s.csv"
    assert main(["detect", str(tmp_path / "missing.npz"), str(out)]) == 2
    assert "no such file" in capsys.readouterr().err and not out.exists()
    assert main(["detect", "synthetic:n=32,size=8", str(tmp_path / "s.txt")]) == 2
    assert main(["detect", "synthetic:n=32,size=8", str(out), "--method", "dvae", "--detector", "jpeg",
                 "--preset", "smoke",
                 "--epochs", "1", "--quiet"]) == 2
    assert "exposes no stage-1 p_hat" in capsys.readouterr().err and not out.exists()
    assert main(["detect", "synthetic:n=32,size=8", str(out), "--method", "dvae", "--param", "oops"]) == 2


@pytest.mark.skipif("dvae" not in DEFENSES, reason="dvae purifier not registered yet")
def test_stage1_only_dvae_p_hat_shape() -> None:
    from unpoison.detect import stage1_p_hat

    ds = make_synthetic(n=48, size=8, channels=3, classes=4, seed=0)
    p, info = stage1_p_hat(ds.x_train, ds.y_train, "dvae", {"preset": "cpu", "epochs": 1}, device="cpu",
                           progress=False)
    assert p.shape == ds.x_train.shape and p.dtype == np.float32 and np.isfinite(p).all()
    p2, _ = stage1_p_hat(ds.x_train[:24], ds.y_train[:24], "dvae", {"preset": "cpu", "epochs": 1},
                         x_apply=ds.x_train[24:], y_apply=ds.y_train[24:], device="cpu", progress=False)
    assert p2.shape == ds.x_train[24:].shape
