"""The scoring protocol: it learns an obvious signal in seconds (API and CLI), and augmentation is real."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unpoison.data import make_synthetic
from unpoison.scoring import evaluate
from unpoison.train import TrainConfig, augment_batch

SPEC = "synthetic:n=128,size=16,channels=3,classes=4,seed=0"
#: the smoke preset (tinycnn) with enough steps for 128 images: 8 epochs x 4 batches of 32
CFG = {"epochs": 8, "batch_size": 32}


def test_evaluate_api_learns_a_clear_signal() -> None:
    ds = make_synthetic(n=128, size=16, channels=3, classes=4, seed=0)
    rec = evaluate(ds, config=TrainConfig.preset("smoke", **CFG), seed=0, device="cpu", progress=False)
    assert rec["final_acc"] >= 90.0, rec
    assert set(rec["per_class_acc"]) == set(ds.classes) and rec["n_train"] == 128 and rec["n_test"] == 32
    assert len(rec["history"]) == 8 and rec["images_per_s"] > 0


def test_evaluate_api_does_not_learn_noise() -> None:
    """The control: with labels shuffled there is nothing to learn, so accuracy stays near chance."""
    ds = make_synthetic(n=128, size=16, channels=3, classes=4, seed=0)
    y = np.random.default_rng(0).permutation(ds.y_train)
    rec = evaluate(ds.replace(y_train=y), config=TrainConfig.preset("smoke", **CFG), seed=0, device="cpu",
                   progress=False)
    assert rec["final_acc"] < 60.0, rec


def test_evaluate_cli_writes_json(out_dir: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    out = out_dir / "eval.json"
    rc, stdout, err = run_cli("evaluate", SPEC, "--preset", "smoke", "--device", "cpu", "--quiet",
                              "--epochs", 8, "--batch-size", 32, "--out", out)
    assert rc == 0, err
    assert "clean test accuracy" in stdout
    rec = json.loads(out.read_text())
    assert rec["command"] == "evaluate" and rec["seed"] == 0 and "torch" in rec["versions"]
    assert rec["result"]["final_acc"] >= 90.0
    assert rec["config"]["preset"] == "smoke"


def _crops(x: torch.Tensor, pad: int) -> list[torch.Tensor]:
    xp = F.pad(x, (pad, pad, pad, pad))
    h, w = x.shape[-2:]
    return [xp[..., i:i + h, j:j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]


def test_augment_batch_is_a_random_crop() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 8, 8, generator=g)
    out = augment_batch(x, pad=2, flip=False, gen=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    moved = 0
    for i in range(len(x)):
        matches = [k for k, c in enumerate(_crops(x[i], 2)) if torch.equal(c, out[i])]
        assert matches, f"image {i} is not a crop of its padded input"
        moved += matches[0] != 12  # index 12 = the centre crop (no shift)
    assert moved > 32  # 24 of 25 offsets move the image


def test_augment_batch_flips_about_half() -> None:
    x = torch.rand(200, 1, 5, 7)
    out = augment_batch(x, pad=0, flip=True, gen=torch.Generator().manual_seed(2))
    assert out.shape == x.shape
    flipped = 0
    for i in range(len(x)):
        same, flip = torch.equal(out[i], x[i]), torch.equal(out[i], x[i].flip(-1))
        assert same or flip
        flipped += flip
    assert 60 < flipped < 140


def test_augment_batch_is_seeded() -> None:
    x = torch.rand(16, 3, 8, 8)
    a = augment_batch(x, 4, True, torch.Generator().manual_seed(3))
    b = augment_batch(x, 4, True, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(augment_batch(x, 0, False), x)


@pytest.mark.parametrize("bad", [{"epochs": 0}, {"batch_size": 0}])
def test_bad_config_is_user_error(bad: dict[str, int]) -> None:
    from unpoison.errors import UserError

    ds = make_synthetic(n=16, size=8, channels=1, classes=2)
    with pytest.raises(UserError):
        evaluate(ds, config=TrainConfig.preset("smoke", **bad), device="cpu", progress=False)
