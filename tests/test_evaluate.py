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


def test_schedule_warms_up_then_ends_cold() -> None:
    """The learning rate rises linearly from ``lr / w`` over the ``w`` warm-up steps, the cosine starts at ``lr``
    and the rate is 0 after the last step."""
    from unpoison.tensors import sgd_cosine

    w = torch.nn.Parameter(torch.zeros(1))
    opt, sched = sgd_cosine([w], 0.1, total_steps=10, warmup_steps=4)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.1 * (0.25 + 0.75 * k / 4) for k in range(4)])  # 0.025 .. 0.08125
    # cosine over the remaining 6 steps: 0.1 * (1 + cos(pi * k / 6)) / 2
    assert lrs[4:] == pytest.approx([0.05 * (1 + np.cos(np.pi * k / 6)) for k in range(6)])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    opt, sched = sgd_cosine([w], 0.1, total_steps=3)  # no warm-up: the plain cosine, also cold at the end
    for _ in range(3):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_ema_scores_the_average_of_the_weights() -> None:
    """With ``ema`` the scored model is the exponential moving average of every step's weights (and BN
    buffers): checked against the average computed by hand from a copy of each step's weights."""
    from unpoison.train import train_classifier

    ds = make_synthetic(n=64, size=8, channels=1, classes=2, seed=0)
    cfg = TrainConfig.preset("smoke", epochs=2, batch_size=32, ema=0.5)
    res = train_classifier(ds, None, cfg, seed=3, device="cpu", progress=False)
    plain = train_classifier(ds, None, TrainConfig.preset("smoke", epochs=2, batch_size=32), seed=3, device="cpu",
                             progress=False)
    # replay: the same seed gives the same iterates; record them with a hook on the optimizer step
    snaps: list[dict[str, torch.Tensor]] = []
    orig = torch.optim.SGD.step

    def step(self, *a, **k):  # type: ignore[no-untyped-def]
        out = orig(self, *a, **k)
        snaps.append({n: p.detach().clone() for n, p in zip(names, self.param_groups[0]["params"])})
        return out

    names = [n for n, _ in plain.model.named_parameters()]
    torch.optim.SGD.step = step  # type: ignore[method-assign]
    try:
        train_classifier(ds, None, TrainConfig.preset("smoke", epochs=2, batch_size=32), seed=3, device="cpu",
                         progress=False)
    finally:
        torch.optim.SGD.step = orig  # type: ignore[method-assign]
    assert len(snaps) == 4
    ema = snaps[0]  # the first update copies the weights, each later one moves halfway (decay 0.5)
    for s in snaps[1:]:
        ema = {n: 0.5 * ema[n] + 0.5 * s[n] for n in ema}
    got = dict(res.model.named_parameters())
    for n in names:
        torch.testing.assert_close(got[n].detach(), ema[n])
    assert not torch.equal(got[names[0]], dict(plain.model.named_parameters())[names[0]])


def test_tta_flip_averages_an_image_and_its_mirror() -> None:
    """A model that sees only the left half: flip TTA adds the logits of the mirror image."""
    from unpoison.train import predict

    class LeftHalf(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            left = x[..., : x.shape[-1] // 2].mean((1, 2, 3))
            return torch.stack([left, 1 - left], 1)

    x = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    x[0, ..., :2] = 255  # bright left half: class 0 without TTA
    x[1, ..., :1] = 255  # a thin bright left stripe (mean 0.5 of the left half): ties broken by the mirror image
    x[1, ..., 2:] = 0
    assert predict(LeftHalf(), x).tolist() == [0, 0]
    # with TTA: image 0 -> logits (1, 0) + (0, 1) = tie -> argmax 0; image 1 -> (0.5, 0.5) + (0, 1) -> class 1
    assert predict(LeftHalf(), x, tta_flip=True).tolist() == [0, 1]


def test_protocol_is_deterministic_by_seed_with_every_piece_on() -> None:
    ds = make_synthetic(n=64, size=8, channels=3, classes=2, seed=1)
    cfg = {"epochs": 2, "batch_size": 16, "ema": 0.9, "tta_flip": True, "label_smoothing": 0.1, "warmup_epochs": 1}
    runs = [evaluate(ds, config=TrainConfig.preset("smoke", **cfg), seed=s, device="cpu", progress=False)
            for s in (5, 5, 6)]
    assert runs[0]["history"] == runs[1]["history"]
    assert runs[0]["history"] != runs[2]["history"]


@pytest.mark.parametrize("bad", [{"ema": 1.0}, {"ema": -0.1}, {"warmup_epochs": -1}])
def test_bad_protocol_piece_is_user_error(bad: dict[str, float]) -> None:
    from unpoison.errors import UserError

    with pytest.raises(UserError):
        TrainConfig.preset("smoke", **bad).check()


def test_min_steps_gives_small_sets_more_epochs() -> None:
    """``min_steps``: epochs = max(epochs, ceil(min_steps / ceil(n / batch))); an explicit epoch count wins."""
    cfg = TrainConfig(epochs=15, batch_size=128, min_steps=1000)
    assert cfg.epochs_for(10000) == 15  # 79 steps an epoch: 15 epochs = 1185 steps >= 1000
    assert cfg.epochs_for(5064) == 25  # 40 steps an epoch: ceil(1000 / 40) = 25
    assert cfg.epochs_for(100) == 1000  # one step an epoch
    assert TrainConfig(epochs=15, min_steps=0).epochs_for(100) == 15
    assert TrainConfig.preset("cpu", min_steps=1000, epochs=3).min_steps == 1000
    explicit = TrainConfig.preset("cpu", epochs=3)
    assert explicit.epochs_for(100) == 3 and explicit.min_steps == 0
    ds = make_synthetic(n=64, size=8, channels=1, classes=2, seed=0)
    rec = evaluate(ds, config=TrainConfig(model="tinycnn", epochs=1, batch_size=32, min_steps=6), seed=0,
                   device="cpu", progress=False)
    assert len(rec["history"]) == 3  # 2 steps an epoch (48 training images), 6 steps: 3 epochs
