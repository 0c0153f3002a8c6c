"""Kill and resume equals an uninterrupted run, bit for bit: checkpoints carry every RNG state and data position.

Runs are killed right after a checkpoint is written (a SIGKILL anywhere later resumes from the same
file) or in the middle of an epoch, then resumed with ``resume=True`` in a fresh object.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unpoison import rng
from unpoison.attacks import make_attack
from unpoison.attacks._surrogate import SurrogateAttack
from unpoison.data import make_synthetic
from unpoison.defenses.dvae import DVAEPurifier
from unpoison.defenses.dvae import purifiers as dvae_mod
from unpoison.errors import UserError

pytestmark = pytest.mark.usefixtures("one_thread")


class _Kill(Exception):
    pass


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path) -> None:
    gens = {"data": torch.Generator().manual_seed(3), "noise": torch.Generator().manual_seed(4)}
    path = tmp_path / "s.pt"
    torch.save({"rng": rng.capture(gens)}, path)
    want = [torch.rand(3), torch.rand(3, generator=gens["data"]), torch.randn(3, generator=gens["noise"])]
    torch.manual_seed(99)  # scramble everything, then restore from the file
    gens["data"].manual_seed(0)
    gens["noise"].manual_seed(0)
    rng.restore(torch.load(path, weights_only=True)["rng"], gens)
    got = [torch.rand(3), torch.rand(3, generator=gens["data"]), torch.randn(3, generator=gens["noise"])]
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    state = rng.capture(gens)
    assert "cuda" not in state or torch.cuda.is_available()
    state["devices"]["data"] = "cuda"  # as if written on a GPU
    with pytest.raises(UserError, match="written on cuda"):
        rng.restore(state, gens, tmp_path)
    with pytest.raises(UserError, match="no state for random generator 'other'"):
        rng.restore(rng.capture(gens), {"other": torch.Generator()})


def _poisoned(n: int = 80, size: int = 8, k: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng_ = np.random.default_rng(0)
    y = np.arange(n) % k
    x = rng_.integers(30, 220, size=(n, size, size, 1)) + rng_.choice([-20, 20], size=(k, size, size, 1))[y]
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


def test_dvae_killed_mid_epoch_resumes_bit_for_bit(tmp_path, monkeypatch) -> None:
    """80 images in batches of 32 (3 steps an epoch, the last one short); killed inside stage 2's second
    epoch, i.e. after its first epoch's checkpoint: the resumed run redoes that epoch from the saved state."""
    x, y = _poisoned()
    kw = {"preset": "cpu", "width": 8, "latent": 8, "batch_size": 32, "epochs": 2, "device": "cpu",
          "progress": False}
    ref = DVAEPurifier(**kw)
    ref_out = ref.fit_purify(x, y)
    real_loss, calls = dvae_mod.dvae_loss, []

    def dying_loss(*a, **k):  # stage 1: 6 steps; stage 2 epoch 1: 3 more; die at the 2nd step of epoch 2
        calls.append(1)
        if len(calls) == 11:
            raise _Kill
        return real_loss(*a, **k)

    ck = tmp_path / "ck"
    monkeypatch.setattr(dvae_mod, "dvae_loss", dying_loss)
    with pytest.raises(_Kill):
        DVAEPurifier(**kw, checkpoint_dir=ck).fit_purify(x, y)
    monkeypatch.undo()
    state = torch.load(ck / "stage2.epoch.pt", weights_only=True)
    assert state["epoch"] == 1
    assert set(state["rng_state"]) >= {"cpu", "generators", "devices"} and "data" in state["rng_state"]["generators"]
    torch.manual_seed(12345)  # the global RNG as another process would have it: the checkpoint must restore it
    res = DVAEPurifier(**kw, checkpoint_dir=ck, resume=True)
    out = res.fit_purify(x, y)
    assert np.array_equal(out, ref_out)
    assert res.history_["stage2"][1]["loss"] == ref.history_["stage2"][1]["loss"]


#: tiny settings; 40 images in batches of 16 = 3 batches a pass, so EM/REM rounds of 2 steps end mid-pass
ATTACKS = {
    "em": ({"rounds": 3, "train_steps": 2, "pgd_steps": 1, "stop_acc": 101.0}, 1),
    "rem": ({"rounds": 2, "train_steps": 2, "pgd_steps": 1, "adv_steps": 1, "eot": 1, "stop_acc": 101.0}, 1),
    "tap": ({"train_epochs": 1, "pgd_steps": 2}, 2),
    "sep": ({"train_epochs": 2, "n_checkpoints": 2, "pgd_steps": 1, "vr_inner": 2}, 2),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_surrogate_attack_killed_resumes_bit_for_bit(name: str, tmp_path, monkeypatch) -> None:
    """Killed right after its ``kill_at``-th checkpoint (EM/REM: after round 1, which ends in the middle of a
    pass over the data; TAP/SEP: after the first PGD batch), resumed in a fresh attack object."""
    params, kill_at = ATTACKS[name]
    ds = make_synthetic(n=40, size=8, channels=3, classes=4, seed=1)
    kw = {"seed": 0, "device": "cpu", "progress": False, "preset": "cpu", "surrogate": "tinycnn", "batch_size": 16,
          **params}
    full = make_attack(name, **kw).poison(ds.x_train, ds.y_train)
    real_save, saves = SurrogateAttack.save_ckpt, []

    def save_then_die(self, state):
        real_save(self, state)
        saves.append(1)
        if len(saves) == kill_at:
            raise _Kill

    monkeypatch.setattr(SurrogateAttack, "save_ckpt", save_then_die)
    with pytest.raises(_Kill):
        make_attack(name, checkpoint_dir=str(tmp_path), **kw).poison(ds.x_train, ds.y_train)
    monkeypatch.undo()
    saved = torch.load(tmp_path / f"{name}.pt", weights_only=True)
    assert set(saved["rng"]["generators"]) == {"gen", "cpu_gen"}
    torch.manual_seed(12345)
    resumed = make_attack(name, checkpoint_dir=str(tmp_path), resume=True, **kw).poison(ds.x_train, ds.y_train)
    np.testing.assert_array_equal(full.x, resumed.x)
