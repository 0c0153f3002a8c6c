"""Baseline defenses: fixed purifiers against independent computations, PGD bounds, AT/UEraser on a
shortcut toy, the AVATAR path end to end, and bad input through the CLI."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from unpoison.cli import main
from unpoison.data import ImageDataset, load_dataset
from unpoison.defenses import TRAIN_DEFENSES, make_purifier, make_train_defense
from unpoison.defenses.training import UEraser, pgd_attack
from unpoison.errors import UserError
from unpoison.models import create_model
from unpoison.train import TrainConfig, train_classifier

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int = 6, size: int = 16, channels: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = rng.uniform(0, 255, size=(n, 4, 4, channels)).repeat(size // 4, 1).repeat(size // 4, 2)
    return np.clip(smooth + rng.normal(0, 30, size=smooth.shape), 0, 255).astype(np.uint8)


# --- fixed purifiers against independent computations -----------------------------------------
@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("quality", [10, 75])
def test_jpeg_matches_pillow_round_trip(channels: int, quality: int) -> None:
    x = _images(channels=channels)
    out = make_purifier("jpeg", quality=quality).fit_purify(x)
    for i in range(len(x)):
        buf = io.BytesIO()
        Image.fromarray(x[i].squeeze(-1) if channels == 1 else x[i]).save(buf, "JPEG", quality=quality)
        ref = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
        np.testing.assert_array_equal(out[i], ref.reshape(x[i].shape))
    assert not np.array_equal(out, x)


def test_jpeg_lower_quality_changes_more() -> None:
    x = _images(n=8)
    err = [np.abs(make_purifier("jpeg", quality=q).fit_purify(x).astype(int) - x).mean() for q in (10, 50, 90)]
    assert err[0] > err[1] > err[2]


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_bdr_matches_integer_arithmetic(bits: int) -> None:
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, -1)
    x[..., 1] = x[..., 1][:, ::-1]
    out = make_purifier("bdr", bits=bits, device="cpu").fit_purify(x)
    levels = 2**bits - 1
    xi = x.astype(np.int64)
    q = (2 * xi * levels + 255) // 510  # round(x * levels / 255), no ties possible
    ref = (2 * q * 255 + levels) // (2 * levels)  # round(q * 255 / levels)
    np.testing.assert_array_equal(out, ref.astype(np.uint8))
    assert len(np.unique(out)) == levels + 1
    if bits == 8:
        np.testing.assert_array_equal(out, x)


def test_gray_matches_itu_601_formula() -> None:
    x = _images(n=4)
    out = make_purifier("gray", device="cpu").fit_purify(x)
    r, g, b = (x[..., i].astype(np.float32) for i in range(3))
    luma = (np.float32(0.2989) * r + np.float32(0.587) * g + np.float32(0.114) * b).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], luma)
    x1 = _images(n=3, channels=1)
    np.testing.assert_array_equal(make_purifier("gray", device="cpu").fit_purify(x1), x1)


@pytest.mark.parametrize("size", [3, 5])
def test_median_matches_scipy(size: int) -> None:
    x = _images(n=3)
    out = make_purifier("median", size=size, device="cpu").fit_purify(x)
    # torch's "reflect" padding is scipy's "mirror" (edge pixel not repeated)
    ref = ndimage.median_filter(x, size=(1, size, size, 1), mode="mirror")
    np.testing.assert_array_equal(out, ref)


def test_gauss_keeps_constant_images_and_smooths_noise() -> None:
    const = np.full((2, 16, 16, 3), 77, np.uint8)
    np.testing.assert_array_equal(make_purifier("gauss", sigma=1.5, kernel_size=5).fit_purify(const), const)
    noisy = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    out = make_purifier("gauss", sigma=1.5, kernel_size=5).fit_purify(noisy)
    assert out.astype(float).std() < 0.6 * noisy.astype(float).std()


# --- PGD ------------------------------------------------------------------------------------------
def test_pgd_stays_in_eps_ball_and_image_range() -> None:
    torch.manual_seed(0)
    model = create_model("tinycnn", 4, 3, 16)
    model.train()
    x = torch.rand(16, 3, 16, 16)
    x[:4] = 0.0  # corners of the box: the clip to [0,1] must bind
    x[4:8] = 1.0
    y = torch.randint(0, 4, (16,))
    eps = 8 / 255
    adv = pgd_attack(model, x, y, eps=eps, steps=10, step_size=1.6 / 255)
    assert (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert (adv - x).abs().max() > eps / 2  # it moved
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())  # parameter gradients untouched
    model.eval()
    with torch.no_grad():
        lc = torch.nn.functional.cross_entropy(model(x), y)
        la = torch.nn.functional.cross_entropy(model(adv), y)
    assert la > lc
    at = make_train_defense("at")
    assert at.eps == pytest.approx(8 / 255) and at.steps == 10 and at.step_size == pytest.approx(1.6 / 255)


def test_ueraser_switches_to_one_copy_after_switch_step() -> None:
    calls: list[int] = []

    class Spy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = create_model("tinycnn", 4, 3, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(len(x))
            return self.net(x)

    model = Spy().train()
    ue = make_train_defense("ueraser", repeats=5, switch_step=2)
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 4, (8,))
    outs = [ue(model, x, y) for _ in range(3)]
    assert calls == [40, 40]  # K=5 ranking for the first two batches, none afterwards
    assert model.training
    for o in outs:
        assert o.shape == x.shape and o.min() >= 0 and o.max() <= 1
        assert not torch.equal(o, x)
    with pytest.raises(UserError):
        UEraser(repeats=0)
    assert set(TRAIN_DEFENSES.names()) >= {"at", "ueraser"}


# --- AT and UEraser on a shortcut toy ------------------------------------------------------------
def _shortcut_toy(seed: int = 0, n: int = 1024, n_test: int = 256, size: int = 16) -> tuple[ImageDataset, ImageDataset]:
    """Four classes told apart by a large grey shape (robust, slower to learn) at a random place.

    The poisoned copy adds a class-wise colour tint of +-8/255 on two channels: a shortcut a CNN
    picks up almost at once (it survives every crop and the random brightness), that PGD with
    eps 8/255 can erase and that channel shuffling scrambles. The test split is clean.
    """
    masks = np.zeros((4, 8, 8))
    masks[0, 2:6, :] = 1  # horizontal bar
    masks[1, :, 2:6] = 1  # vertical bar
    masks[2] = 1
    masks[2, 2:6, 2:6] = 0  # ring
    masks[3, 2:6, 2:6] = 1  # small square
    tint = np.array([[1, -1, 0], [-1, 1, 0], [0, 1, -1], [0, -1, 1]], float) * 8

    def draw(rng: np.random.Generator, m: int, poison: bool) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(m) % 4
        rng.shuffle(y)
        x = rng.uniform(40, 120, size=(m, 1, 1, 1)) + rng.normal(0, 30, size=(m, size, size, 3))
        for i in range(m):
            r, c = rng.integers(0, size - 8 + 1, 2)
            x[i, r:r + 8, c:c + 8, :] += 60 * masks[y[i]][:, :, None]
        if poison:
            x = x + tint[y][:, None, None, :]
        return np.clip(np.rint(x), 0, 255).astype(np.uint8), y.astype(np.int64)

    x_tr, y_tr = draw(np.random.default_rng(seed), n, False)
    x_po, _ = draw(np.random.default_rng(seed), n, True)  # the same images plus the shortcut
    x_te, y_te = draw(np.random.default_rng(seed + 999), n_test, False)
    clean = ImageDataset(x_tr, y_tr, x_te, y_te, [f"c{i}" for i in range(4)], source="toy", format="npz")
    return clean, clean.replace(x_train=x_po)


def test_at_and_ueraser_beat_plain_training_on_a_shortcut() -> None:
    clean, poisoned = _shortcut_toy(seed=0)
    cfg = TrainConfig.preset("smoke", epochs=6, crop_pad=0, flip=False)
    acc = {}
    for name, ds, defense in [("clean", clean, None), ("plain", poisoned, None),
                              ("at", poisoned, make_train_defense("at")),
                              ("ueraser", poisoned, make_train_defense("ueraser"))]:
        acc[name] = train_classifier(ds, config=cfg, seed=0, device="cpu", train_defense=defense,
                                     progress=False).final_acc
    # seeds 0-2 gave clean 98-100, plain 28-33, AT 60-94, UEraser 48-71 (ueraser: K=5 throughout)
    assert acc["clean"] >= 90, acc  # the true task is learnable
    assert acc["plain"] <= 50, acc  # the shortcut works as a poison
    assert acc["at"] >= acc["plain"] + 15, acc
    assert acc["ueraser"] >= acc["plain"] + 10, acc


# --- AVATAR ------------------------------------------------------------------------------------
def test_avatar_end_to_end_through_the_cli(tmp_path) -> None:
    data = "synthetic:n=48,size=15,channels=3,classes=4,seed=1"  # 15 px: exercises reflect padding
    ckpt = tmp_path / "toy.pt"
    assert main(["train-diffusion", data, str(ckpt), "--preset", "toy", "--epochs", "1", "--device", "cpu",
                 "--quiet"]) == 0
    blob = torch.load(ckpt, weights_only=True)
    cfg = json.loads(blob["config"])
    assert (cfg["channels"], cfg["height"], cfg["padded_height"]) == (3, 15, 16)
    assert json.loads((tmp_path / "toy.pt.manifest.json").read_text())["command"] == "train-diffusion"
    out = tmp_path / "pur.npz"
    assert main(["purify", data, str(out), "--method", "avatar", "--checkpoint", str(ckpt), "--t-star", "4",
                 "--device", "cpu", "--quiet"]) == 0
    src, res = load_dataset(data), load_dataset(str(out))
    assert res.x_train.shape == src.x_train.shape and not np.array_equal(res.x_train, src.x_train)
    np.testing.assert_array_equal(res.x_test, src.x_test)
    man = json.loads((tmp_path / "pur.npz.report" / "manifest.json").read_text())
    assert man["stats"]["t_star"] == 4
    # a checkpoint for other images, a file that is not a checkpoint, no checkpoint: exit 2, nothing written
    bad = tmp_path / "bad.npz"
    assert main(["purify", "synthetic:n=16,size=15,channels=1", str(bad), "--method", "avatar",
                 "--checkpoint", str(ckpt), "--t-star", "4", "--device", "cpu", "--quiet"]) == 2
    assert main(["purify", "synthetic:n=16,size=16,channels=3", str(bad), "--method", "avatar",
                 "--checkpoint", str(ckpt), "--t-star", "4", "--device", "cpu", "--quiet"]) == 2
    junk = tmp_path / "junk.pt"
    torch.save({"hello": 1}, junk)
    assert main(["purify", data, str(bad), "--method", "avatar", "--checkpoint", str(junk), "--quiet"]) == 2
    assert main(["purify", data, str(bad), "--method", "avatar", "--quiet"]) == 2
    assert main(["purify", data, str(bad), "--method", "avatar", "--checkpoint", str(ckpt), "--t-star",
                 "1000", "--quiet"]) == 2
    assert not bad.exists()


# --- bad input through the CLI -------------------------------------------------------------------
@pytest.mark.parametrize("flags", [
    ["--method", "jpeg", "--quality", "0"], ["--method", "jpeg", "--quality", "96"],
    ["--method", "bdr", "--bits", "0"], ["--method", "bdr", "--bits", "9"],
    ["--method", "median", "--size", "4"], ["--method", "median", "--size", "17"],
    ["--method", "gauss", "--kernel-size", "2"], ["--method", "gauss", "--kernel-size", "19"],
    ["--method", "gauss", "--sigma", "0"], ["--method", "jpeg", "--bits", "2"],
])
def test_bad_parameters_exit_2_and_write_nothing(tmp_path, flags: list[str]) -> None:
    out = tmp_path / "out.npz"
    assert main(["purify", "synthetic:n=16,size=16,channels=3", str(out), *flags, "--quiet"]) == 2
    assert not out.exists()


def test_good_parameters_through_the_cli(tmp_path) -> None:
    for flags in (["--method", "jpeg", "--quality", "10"], ["--method", "bdr"], ["--method", "gray"],
                  ["--method", "median", "--size", "3"], ["--method", "gauss", "--sigma", "1", "--kernel-size", "3"]):
        out = tmp_path / f"{flags[1]}.npz"
        assert main(["purify", "synthetic:n=16,size=16,channels=3", str(out), *flags, "--device", "cpu",
                     "--quiet"]) == 0
        assert out.exists() and (tmp_path / f"{flags[1]}.npz.report" / "grid.png").exists()
