"""Resumes keyed by content (not by shape, name or path), and runs that go NaN stop with nothing written."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unpoison.attacks import make_attack
from unpoison.cli import main
from unpoison.data import content_fingerprint, dataset_fingerprint, load_dataset, make_synthetic, save_dataset
from unpoison.defenses import make_purifier
from unpoison.errors import NonFiniteError, UserError

EM = {"seed": 0, "device": "cpu", "progress": False, "preset": "cpu", "surrogate": "tinycnn", "pgd_steps": 1,
      "train_steps": 1, "stop_acc": 101.0}
CLI_EM = ["--attack", "em", "--preset", "cpu", "--surrogate", "tinycnn", "--pgd-steps", "1", "--train-steps", "1",
          "--stop-acc", "101", "--device", "cpu", "--quiet"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # type: ignore[no-untyped-def]
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --- the fingerprint ---------------------------------------------------------------------------------------
def test_fingerprint_streams_and_sees_every_byte(tmp_path) -> None:
    ds = make_synthetic(n=64, size=8, channels=3, classes=4, seed=0)
    fp = content_fingerprint(ds.x_train, ds.y_train)
    assert content_fingerprint(ds.x_train, ds.y_train, chunk_bytes=100) == fp  # chunking does not matter
    np.save(tmp_path / "x.npy", ds.x_train)
    assert content_fingerprint(np.load(tmp_path / "x.npy", mmap_mode="r"), ds.y_train) == fp  # memmap, streamed
    x = ds.x_train.copy()
    x[37, 5, 2, 1] ^= 1
    assert content_fingerprint(x, ds.y_train) != fp  # one bit of one pixel
    y = ds.y_train.copy()
    y[[0, 1]] = y[[1, 0]] if y[0] != y[1] else (y[0], (y[1] + 1) % 4)
    assert content_fingerprint(ds.x_train, y) != fp
    assert content_fingerprint(ds.x_train, None) != fp
    assert content_fingerprint(ds.x_train.reshape(64, 8, 24, 1), ds.y_train) != fp  # same bytes, other shape
    assert dataset_fingerprint(ds) != dataset_fingerprint(ds.replace(classes=["a", "b", "c", "d"]))


# --- poison --resume ------------------------------------------------------------------------------------------
def test_poison_resume_refuses_changed_images_with_same_shape_and_labels(tmp_path) -> None:
    ds = make_synthetic(n=32, size=8, channels=3, classes=2, seed=0)
    changed = ds.x_train.copy()
    changed[3, 4, 4, 0] ^= 7  # same shape, same labels: only content differs
    ck = tmp_path / "ck"
    make_attack("em", rounds=1, checkpoint_dir=str(ck), **EM).poison(ds.x_train, ds.y_train)
    assert (ck / "em.pt").exists()
    with pytest.raises(UserError, match="different run"):
        make_attack("em", rounds=2, checkpoint_dir=str(ck), resume=True, **EM).poison(changed, ds.y_train)
    make_attack("em", rounds=2, checkpoint_dir=str(ck), resume=True, **EM).poison(ds.x_train, ds.y_train)


def test_poison_cli_resume_refuses_a_replaced_input_file(tmp_path, capsys) -> None:
    """The file at the same path is replaced by other images: --resume must not mix the old state in."""
    ds = make_synthetic(n=32, size=8, channels=3, classes=2, seed=0)
    src = save_dataset(ds, tmp_path / "in.npz")
    out = tmp_path / "out.npz"
    # a killed run's checkpoint, made from the original content
    make_attack("em", rounds=1, checkpoint_dir=str(tmp_path / "out.npz.report" / "checkpoints"), **EM).poison(
        ds.x_train, ds.y_train)
    x = ds.x_train.copy()
    x[0] = 255 - x[0]
    src.unlink()
    save_dataset(ds.replace(x_train=x), src)
    capsys.readouterr()
    assert main(["poison", str(src), str(out), *CLI_EM, "--rounds", "2", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "different run" in err and not out.exists()


# --- D-VAE resume (content-keyed through the same function) ----------------------------------------------------
def test_dvae_resume_refuses_changed_images(tmp_path) -> None:
    ds = make_synthetic(n=32, size=8, channels=1, classes=2, seed=0)
    kw = {"preset": "cpu", "width": 4, "latent": 8, "epochs": 1, "batch_size": 16, "device": "cpu", "progress": False,
          "checkpoint_dir": tmp_path}
    make_purifier("dvae", **kw).fit(ds.x_train, ds.y_train)
    x = ds.x_train.copy()
    x[1, 1, 1, 0] ^= 1
    with pytest.raises(UserError, match="other input data"):
        make_purifier("dvae", **kw, resume=True).fit(x, ds.y_train)


# --- non-finite: stop, one line, exit 2, nothing written ---------------------------------------------------------
def test_dvae_nan_loss_stops_before_the_epoch_is_checkpointed(tmp_path, monkeypatch) -> None:
    from unpoison.defenses.dvae import purifiers as dvae

    real = dvae.dvae_loss

    def nan_loss(*a, **k):  # type: ignore[no-untyped-def]
        loss, parts = real(*a, **k)
        return loss * float("nan"), parts

    monkeypatch.setattr(dvae, "dvae_loss", nan_loss)
    ds = make_synthetic(n=32, size=8, channels=1, classes=2, seed=0)
    p = make_purifier("dvae", preset="cpu", width=4, latent=8, epochs=2, batch_size=16, device="cpu", progress=False,
                      checkpoint_dir=tmp_path)
    with pytest.raises(NonFiniteError, match="stage1 diverged: loss is nan at epoch 1"):
        p.fit(ds.x_train, ds.y_train)
    assert not list(tmp_path.glob("*.pt"))


@pytest.mark.parametrize("argv", [
    ["purify", "{in}", "{out}", "--method", "dvae", "--preset", "cpu", "--width", "4", "--latent", "8", "--epochs", "1",
     "--lr", "1e30"],
    ["poison", "{in}", "{out}", *CLI_EM, "--rounds", "2", "--lr", "1e30"],
    ["poison", "{in}", "{out}", "--attack", "tap", "--preset", "cpu", "--surrogate", "tinycnn", "--train-epochs", "2",
     "--lr", "1e30"],
    ["evaluate", "{in}", "--preset", "smoke", "--lr", "1e30", "--out", "{out}"],
])
def test_divergence_is_one_line_exit_2_nothing_written(tmp_path, capsys, argv) -> None:  # type: ignore[no-untyped-def]
    src = save_dataset(make_synthetic(n=32, size=8, channels=3, classes=2, seed=0), tmp_path / "in.npz")
    out = tmp_path / "out.npz"
    capsys.readouterr()
    rc = main([a.format(**{"in": src, "out": out}) for a in argv] + ["--device", "cpu", "--quiet", "--seed", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and ("diverged" in err or "not finite" in err), err
    assert not out.exists()
    assert load_dataset(src).x_train.shape == (32, 8, 8, 3)


def test_attack_output_checked_for_nan_before_rounding() -> None:
    from unpoison.attacks.base import Attack

    class Broken(Attack):
        name = "broken"

        def _craft(self, x, y, num_classes):  # type: ignore[no-untyped-def]
            return torch.full((len(x), x.shape[3], x.shape[1], x.shape[2]), float("nan"))

    ds = make_synthetic(n=8, size=8, channels=1, classes=2)
    with pytest.raises(NonFiniteError, match="non-finite perturbation"):
        Broken(device="cpu", progress=False).poison(ds.x_train, ds.y_train)


def test_attack_cache_key_covers_the_code_it_runs_and_not_the_purifiers() -> None:
    """A cached poison is keyed by the source of the modules that made it: a surrogate attack's include every
    classifier family (listed from the package, whatever is imported) but not the purification auto-encoders',
    so a D-VAE edit does not throw away crafted EM/TAP poisons; a class-wise attack's include no model."""
    import unpoison.models
    from unpoison.attacks import ATTACKS

    em, lsp = ATTACKS.get("em").code_modules(), ATTACKS.get("lsp").code_modules()
    assert {"unpoison.attacks.em", "unpoison.attacks._surrogate", "unpoison.tensors", "unpoison.rng",
            "unpoison.models.small_cnn", "unpoison.models.resnet", "unpoison.models._factory"} <= set(em)
    assert "unpoison.models.dvae" not in em and not [m for m in lsp if m.startswith("unpoison.models")]
    assert unpoison.models.DVAE.__module__ == "unpoison.models.dvae"  # the module left out is the D-VAE's
    assert ATTACKS.get("em").code_version() != ATTACKS.get("tap").code_version()
