"""The attack suite: bounds on the stored uint8 result, determinism, efficacy signals, exact ratios, CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from unpoison.attacks import ATTACKS, apply_perturbation, make_attack
from unpoison.attacks.base import verify_bound
from unpoison.cli import main
from unpoison.data import load_dataset, make_synthetic
from unpoison.errors import UserError

#: the smallest settings that still run every code path of each attack: each attack declares its own
TINY: dict[str, dict] = {name: dict(ATTACKS.get(name).SMOKE) for name in ATTACKS.names()}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny batches run faster on one thread (and do not fight other processes for the cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_every_attack_module_registers_itself():
    """Discovery, not a list: every public module of the package defines (and so registers) an attack."""
    import pkgutil

    import unpoison.attacks as pkg

    modules = {m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_") and m.name != "base"}
    owners = {ATTACKS.get(n).__module__.rsplit(".", 1)[1] for n in ATTACKS.names()}
    assert modules and modules <= owners, modules - owners
    assert all(ATTACKS.get(n).name == n for n in ATTACKS.names())  # register() set the name


@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(n=st.integers(12, 24), size=st.integers(8, 12), channels=st.sampled_from([1, 3]),
       classes=st.integers(2, 3), seed=st.integers(0, 1000), data=st.data())
def test_bounds_hold_for_every_attack(n, size, channels, classes, seed, data):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)
    x[: max(1, n // 4)] = rng.choice([0, 255], size=(max(1, n // 4), size, size, channels))  # saturated images
    y = np.arange(n) % classes
    big = data.draw(st.booleans())
    for name, params in TINY.items():
        cls = ATTACKS.get(name)
        eps = None
        if big and cls.norm == "linf":
            eps = 16 / 255
        elif big and cls.norm == "l2":
            eps = 2.0
        res = make_attack(name, eps=eps, seed=seed, device="cpu", progress=False, **params).poison(x, y)
        assert res.x.dtype == np.uint8 and res.x.shape == x.shape
        assert res.delta.dtype == np.int16
        np.testing.assert_array_equal(res.x.astype(np.int16) - x.astype(np.int16), res.delta)
        d = res.delta.astype(np.float64) / 255
        per = d.reshape(n, -1)
        e = res.info["eps"]
        if cls.norm == "linf":
            assert np.abs(per).max() <= e + 0.5 / 255 + 1e-9, name
        elif cls.norm == "l2":
            assert e == pytest.approx((eps or 1.0) * math.sqrt(size * size * channels / 3072))
            assert np.sqrt((per**2).sum(1)).max() <= e + math.sqrt(per.shape[1]) * 0.5 / 255 + 1e-9, name
        else:
            changed = (np.abs(res.delta).max(-1) > 0).reshape(n, -1).sum(1)
            assert changed.max() <= 1, name
        assert res.info["attack"] == name and res.info["norm"] == cls.norm
        json.dumps(res.info)  # JSON-able


def test_verify_bound_catches_a_broken_bound():
    delta = np.zeros((3, 4, 4, 1), np.int16)
    delta[1, 0, 0, 0] = 9
    with pytest.raises(ValueError, match="image 1"):
        verify_bound(delta, "linf", 8 / 255)
    delta[1, 0, 0, 0] = 8
    verify_bound(delta, "linf", 8 / 255)
    delta[2, 1, 1, 0] = 1
    delta[2, 2, 2, 0] = 1
    with pytest.raises(ValueError):
        verify_bound(delta, "l0", 1)


@pytest.fixture(scope="module")
def small():
    return make_synthetic(n=64, size=16, channels=3, classes=4, seed=1, signal=30)


def test_same_seed_same_output(small):
    x, y = small.x_train[:24, :12, :12], small.y_train[:24]
    for name, params in TINY.items():
        a = make_attack(name, seed=3, device="cpu", progress=False, **params).poison(x, y)
        b = make_attack(name, seed=3, device="cpu", progress=False, **params).poison(x, y)
        np.testing.assert_array_equal(a.x, b.x, err_msg=name)
        if name == "lsp":
            c = make_attack(name, seed=4, device="cpu", progress=False, **params).poison(x, y)
            assert not np.array_equal(a.x, c.x)  # the seed matters


def test_em_lowers_the_surrogates_loss_below_clean(small):
    res = make_attack("em", seed=0, device="cpu", progress=False, preset="cpu", surrogate="tinycnn", rounds=2,
                      pgd_steps=5, stop_acc=101.0).poison(small.x_train, small.y_train)
    info = res.info
    # both losses are of the same final surrogate: error-minimizing noise makes the data "easier"
    assert info["surrogate_loss_poisoned"] < 0.5 * info["surrogate_loss_clean"]
    assert info["rounds_run"] == 2


def test_em_resume_continues_identically(small, tmp_path):
    kw = {"seed": 0, "device": "cpu", "progress": False, "preset": "cpu", "surrogate": "tinycnn", "pgd_steps": 2,
          "stop_acc": 101.0}
    full = make_attack("em", rounds=2, **kw).poison(small.x_train, small.y_train)
    make_attack("em", rounds=1, checkpoint_dir=str(tmp_path), **kw).poison(small.x_train, small.y_train)
    resumed = make_attack("em", rounds=2, checkpoint_dir=str(tmp_path), resume=True, **kw).poison(
        small.x_train, small.y_train)
    np.testing.assert_array_equal(full.x, resumed.x)
    other = make_attack("em", rounds=2, checkpoint_dir=str(tmp_path), resume=True, **{**kw, "seed": 1})
    with pytest.raises(UserError, match="different run"):
        other.poison(small.x_train, small.y_train)


def test_ops_finds_a_planted_pixel():
    rng = np.random.default_rng(0)
    n, size = 40, 10
    x = rng.integers(60, 200, size=(n, size, size, 3), dtype=np.uint8)
    y = np.arange(n) % 2
    # class 0: pixel (3, 7) is always nearly black -> white (1,1,1) is a large, constant change there
    x[y == 0, 3, 7] = rng.integers(0, 3, size=((y == 0).sum(), 3))
    # class 1: pixel (8, 1) is always nearly pure red -> cyan (0,1,1) is the consistent opposite
    x[y == 1, 8, 1] = [253, 2, 1]
    res = make_attack("ops", progress=False).poison(x, y)
    px = res.info["pixels"]
    assert px[0]["positions"] == [[3, 7]] and px[0]["colours"] == [[255, 255, 255]]
    assert px[1]["positions"] == [[8, 1]] and px[1]["colours"] == [[0, 255, 255]]
    changed = np.abs(res.delta).max(-1) > 0
    assert (changed.reshape(n, -1).sum(1) == 1).all()  # exactly one position per image


def _linear_probe(feats: np.ndarray, y: np.ndarray) -> float:
    """Held-out accuracy of a least-squares linear classifier (first half fit, second half scored)."""
    f = np.c_[feats, np.ones(len(feats))]
    k = int(y.max()) + 1
    h = len(y) // 2
    w = np.linalg.lstsq(f[:h], np.eye(k)[y[:h]], rcond=None)[0]
    return float(((f[h:] @ w).argmax(1) == y[h:]).mean())


def test_lsp_noise_is_linearly_separable():
    ds = make_synthetic(n=400, size=16, channels=3, classes=5, seed=2)
    res = make_attack("lsp", seed=0, progress=False).poison(ds.x_train, ds.y_train)
    assert _linear_probe(res.delta.reshape(len(res.delta), -1).astype(np.float64), ds.y_train) > 0.95
    # control: the same probe on the clean images' pixels is far from perfect with so few samples per class
    assert _linear_probe(np.random.default_rng(0).normal(size=(400, 768)), ds.y_train) < 0.5


def test_ar_noise_is_linearly_separable_by_its_filter_responses():
    ds = make_synthetic(n=400, size=16, channels=1, classes=5, seed=2)
    res = make_attack("ar", seed=0, progress=False).poison(ds.x_train, ds.y_train)
    coef = torch.tensor(res.info["ar_coefficients"], dtype=torch.float64)
    coef[..., 2, 2] = -1  # the matching filter of each class's AR process
    d = torch.tensor(res.delta, dtype=torch.float64).permute(0, 3, 1, 2)
    energy = torch.nn.functional.conv2d(d, coef).pow(2).mean((2, 3)).clamp_min(1e-12).log().numpy()
    assert _linear_probe(energy, ds.y_train) > 0.9
    assert (energy.argmin(1) == ds.y_train).mean() > 0.9  # each class's own filter responds least


@pytest.mark.parametrize("name", ["lsp", "ar"])
def test_l2_noise_spends_its_whole_budget_after_clipping(name):
    """Half-black images (like Fashion-MNIST) clip away part of a zero-mean pattern; fitting after the clip
    keeps the stored change at the bound, scaling before it does not."""
    ds = make_synthetic(n=60, size=16, channels=1, classes=3, seed=4)
    x = ds.x_train.copy()
    x[:, :, :8] = 0  # left half saturated black
    fit = make_attack(name, seed=0, progress=False).poison(x, ds.y_train)
    raw = make_attack(name, seed=0, progress=False, fit_after_clip=False).poison(x, ds.y_train)
    eps = fit.info["eps"]
    assert fit.info["bound_check"]["mean_l2"] > 0.97 * eps
    assert raw.info["bound_check"]["mean_l2"] < 0.95 * eps
    assert fit.info["bound_check"]["max_l2"] <= fit.info["bound_check"]["limit"]


def test_ar_filters_are_stable_and_textured():
    from unpoison.attacks.ar import _peakiness, ar_generate, high_freq_fraction, stable_coefficients

    g = torch.Generator().manual_seed(3)
    coef = stable_coefficients(6, 1, (16, 16), 2, 5.0, g, min_hf=0.5)
    noise = ar_generate(coef.repeat_interleave(8, 0), (16, 16), g, 2)
    assert (high_freq_fraction(noise).view(6, 8).median(1).values >= 0.4).all()
    assert (_peakiness(noise).view(6, 8).median(1).values < 6.0).all()
    # the criterion bites: unselected random filters include smooth ramps
    raw = stable_coefficients(6, 1, (16, 16), 2, 1e9, torch.Generator().manual_seed(3))
    smooth = high_freq_fraction(ar_generate(raw.repeat_interleave(8, 0), (16, 16), g, 2))
    assert (smooth < 0.5).any()


def test_ratio_poisons_exactly_that_fraction(small):
    for ratio in (0.25, 0.3, 1.0):
        res = make_attack("lsp", seed=5, progress=False).poison(small.x_train, small.y_train, ratio=ratio)
        k = round(ratio * len(small.x_train))
        assert len(res.indices) == len(np.unique(res.indices)) == k
        touched = np.flatnonzero(np.abs(res.delta).reshape(len(res.delta), -1).max(1) > 0)
        assert set(touched) <= set(res.indices.tolist()) and len(touched) >= k - 1
        assert res.info["n_poisoned"] == k
    for bad in (0.0, -0.1, 1.5, 0.001):
        with pytest.raises(UserError):
            make_attack("lsp", progress=False).poison(small.x_train, small.y_train, ratio=bad)


def test_l2_default_is_scaled_to_image_size():
    ds = make_synthetic(n=16, size=28, channels=1, classes=2)
    res = make_attack("lsp", progress=False).poison(ds.x_train, ds.y_train)
    assert res.info["eps"] == pytest.approx(math.sqrt(784 / 3072)) and res.info["eps_nominal"] == 1.0
    lit = make_attack("lsp", eps=0.3, scale_eps=False, progress=False).poison(ds.x_train, ds.y_train)
    assert lit.info["eps"] == pytest.approx(0.3)


@pytest.mark.parametrize("kw", [{"eps": 0}, {"eps": -0.1}, {"eps": 1.5}, {"norm": "l0"}, {"rounds": 2},
                                {"preset": "gpu"}])
def test_bad_attack_settings_are_user_errors(kw, small):
    with pytest.raises(UserError):
        make_attack("lsp" if "rounds" in kw else "em", progress=False, **kw).poison(small.x_train, small.y_train)


def test_one_class_is_a_user_error():
    x = np.zeros((8, 8, 8, 1), np.uint8)
    with pytest.raises(UserError, match="2 classes"):
        make_attack("lsp", progress=False).poison(x, np.zeros(8, np.int64))


# --- CLI -------------------------------------------------------------------------------------------
SPEC = "synthetic:n=48,size=12,channels=3,classes=3"


@pytest.mark.parametrize("extra", [
    ["--attack", "em", "--eps", "0"],
    ["--attack", "em", "--eps=-1/255"],
    ["--attack", "em", "--eps", "2"],
    ["--attack", "lsp", "--ratio", "0"],
    ["--attack", "lsp", "--ratio", "1.5"],
    ["--attack", "nope"],
    ["--attack", "lsp", "--rounds", "3"],
    ["--attack", "ops", "--resume"],
    [],
])
def test_cli_bad_inputs_exit_2_and_write_nothing(tmp_path, capsys, extra):
    out = tmp_path / "out.npz"
    assert main(["poison", SPEC, str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("unpoison poison: error:") and "\n" not in err
    assert list(tmp_path.iterdir()) == []


def test_cli_one_class_dataset(tmp_path):
    assert main(["poison", "synthetic:n=16,size=8,classes=1", str(tmp_path / "o.npz"), "--attack", "lsp"]) == 2
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_dataset_perturbation_and_manifest(tmp_path):
    out = tmp_path / "p.npz"
    assert main(["poison", SPEC, str(out), "--attack", "em", "--preset", "cpu", "--surrogate", "tinycnn",
                 "--rounds", "1", "--pgd-steps", "2", "--ratio", "0.5", "--quiet", "--seed", "2"]) == 0
    clean, pois = load_dataset(SPEC), load_dataset(out)
    rep = tmp_path / "p.npz.report"
    delta = np.load(rep / "perturbation.npy")
    assert delta.dtype == np.int16
    np.testing.assert_array_equal(pois.x_train.astype(np.int16) - clean.x_train, delta)
    np.testing.assert_array_equal(pois.x_test, clean.x_test)
    m = json.loads((rep / "manifest.json").read_text())
    assert m["seed"] == 2 and m["attack"]["attack"] == "em" and len(m["indices_poisoned"]) == 24
    assert "surrogate_acc_poisoned" in m["attack"] and (rep / "grid.png").exists()
    assert not (rep / "checkpoints").exists()


def test_cli_from_perturbation(tmp_path):
    ds = load_dataset(SPEC)
    n = len(ds.x_train)
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.zeros((n - 1, 12, 12, 3), np.float32))
    assert main(["poison", SPEC, str(tmp_path / "a.npz"), "--from-perturbation", str(wrong)]) == 2
    assert not (tmp_path / "a.npz").exists()
    too_big = tmp_path / "big.npy"
    np.save(too_big, np.full((n, 12, 12, 3), 9, np.int16))
    assert main(["poison", SPEC, str(tmp_path / "b.npz"), "--from-perturbation", str(too_big)]) == 2
    assert not (tmp_path / "b.npz").exists()
    pt = tmp_path / "ok.pt"
    torch.save(torch.full((n, 3, 12, 12), -6 / 255), pt)  # float, channels-first, in pixel units
    assert main(["poison", SPEC, str(tmp_path / "c.npz"), "--from-perturbation", str(pt), "--quiet"]) == 0
    out = load_dataset(tmp_path / "c.npz")
    expected = np.clip(ds.x_train.astype(np.int16) - 6, 0, 255)
    np.testing.assert_array_equal(out.x_train, expected)


def test_apply_perturbation_api_checks_shape():
    x = np.zeros((4, 8, 8, 1), np.uint8)
    with pytest.raises(UserError, match="shape"):
        apply_perturbation(x, np.zeros((4, 8, 7, 1), np.float32), "linf", 8 / 255)
    res = apply_perturbation(x, np.full((8, 8, 1), 3, np.int64), "linf", 8 / 255, ratio=0.5)
    assert len(res.indices) == 2 and res.delta.sum() == 2 * 64 * 3


def test_ops_gives_every_class_its_own_pixel_on_a_constant_background():
    """Black borders make every border pixel tie for every class; the shortcut needs distinct positions."""
    ds = make_synthetic(n=50, size=12, channels=1, classes=5, seed=1)
    x = ds.x_train.copy()
    x[:, :3], x[:, -3:], x[:, :, :3], x[:, :, -3:] = 0, 0, 0, 0
    res = make_attack("ops", progress=False).poison(x, ds.y_train)
    pos = [tuple(v["positions"][0]) for v in res.info["pixels"].values()]
    assert len(set(pos)) == 5
    assert all(v["colours"] == [[255]] for v in res.info["pixels"].values())  # white on black
    # spread out: no two classes' pixels are neighbours
    d = [max(abs(a[0] - b[0]), abs(a[1] - b[1])) for i, a in enumerate(pos) for b in pos[i + 1:]]
    assert min(d) >= 2


@pytest.mark.parametrize("name", ["tap", "sep"])
def test_gradient_attacks_reach_saturated_pixels(name):
    """torch's clamp has zero gradient at exactly 0 and 1; a clamp in the graph froze black backgrounds."""
    ds = make_synthetic(n=40, size=12, channels=1, classes=2, seed=3)
    x = ds.x_train.copy()
    x[:, :, :6] = 0  # left half black, like Fashion-MNIST's background
    res = make_attack(name, seed=0, progress=False, **TINY[name]).poison(x, ds.y_train)
    moved = np.abs(res.delta[:, :, :6]) > 0
    assert moved.mean() > 0.1
    assert (res.delta[:, :, :6] >= 0).all()  # and only upwards: the image stays in [0, 255]
