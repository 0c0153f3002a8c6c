"""``unpoison scan``: the verdict on tiny synthetic data (clean / class-wise / sample-wise additive poisons),
self-calibrated on two geometries with no null at all, against a clean reference, and against a null
calibrated here on clean synthetic sets (the shipped-null check); its JSON, bad input, detect sharing the
code, the D-VAE's ``p_refit=auto`` following it, and no reseeding of torch's global generator."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from unpoison.data import ImageDataset, save_dataset
from unpoison.scan import ScanConfig, fit_null, measure, scan

N, SIZE = 400, 12
CFG = ScanConfig(signals=("nb", "linear", "pattern"))
#: the poisons' amplitude in grey levels (16/255: twice the paper's l_inf bound, for 400 tiny images)
AMP = 16.0


def _clean(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST-like clean images: one blob shape per class (fixed across seeds) on an exact-zero
    background, shifted by up to 2 pixels, with a random brightness and texture; fresh draws per seed."""
    shapes = np.kron(np.random.default_rng(0).uniform(size=(4, 4, 4)) > 0.45, np.ones((3, 3)))
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(4), N // 4)
    x = np.zeros((N, SIZE, SIZE, 1), np.float32)
    for i, c in enumerate(y):
        m = np.roll(shapes[c], tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
        x[i, ..., 0] = m * (rng.uniform(90, 200) + rng.normal(0, 30, m.shape))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8), y


@pytest.fixture(scope="module")
def null() -> dict:
    rows = []
    for seed in range(1, 7):
        x, y = _clean(seed)
        stats, _, _ = measure(x, y, CFG, seed=seed, progress=False)
        rows.append({"n": N, **stats})
    return {f"{SIZE}x{SIZE}x1": fit_null(rows)}


def _poison(x: np.ndarray, y: np.ndarray, delta: np.ndarray, ratio: float, seed: int = 0
            ) -> tuple[np.ndarray, np.ndarray]:
    truth = np.zeros(len(x), dtype=bool)
    truth[np.random.default_rng(seed).permutation(len(x))[: int(round(ratio * len(x)))]] = True
    out = x.astype(np.float32)
    out[truth] += delta[truth]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), truth


def _classwise(y: np.ndarray) -> np.ndarray:
    pat = np.random.default_rng(123).choice([-AMP, AMP], size=(4, SIZE, SIZE, 1))
    return pat[y]


def _samplewise(y: np.ndarray) -> np.ndarray:
    """A different noise per image, drawn from a class-dependent distribution (as EM-like poisons are)."""
    rng = np.random.default_rng(7)
    bias = rng.uniform(0.1, 0.9, size=(4, SIZE, SIZE, 1))
    bits = rng.uniform(size=(len(y), SIZE, SIZE, 1)) < bias[y]
    return np.where(bits, AMP, -AMP)


def _f1(flags: np.ndarray, truth: np.ndarray) -> float:
    tp = float((flags & truth).sum())
    return 2 * tp / max(float(flags.sum() + truth.sum()), 1.0)


def test_clean_sets_are_not_flagged(null: dict) -> None:
    for seed in (20, 21):
        x, y = _clean(seed)
        r = scan(x, y, CFG, seed=seed, progress=False, null=null)
        assert r.info["null_calibrated"] and r.info["verdict"]["null_used"]
        assert not r.poisoned and r.score < 1 and r.kind is None
        assert not r.flags.any()


def test_classwise_pattern_is_flagged_and_found(null: dict) -> None:
    x, y = _clean(30)
    xp, truth = _poison(x, y, _classwise(y), 1.0)
    r = scan(xp, y, CFG, progress=False, null=null)
    assert r.poisoned and r.score >= 1 and r.kind == "class-wise"
    assert _f1(r.flags, truth) >= 0.9  # all poisoned: the split must not cut off a "clean" half
    # the evidence names each signal's statistic, its content reference and its z against the null
    assert {"stat", "self_ref", "self_effect", "self_margin", "self_sd", "self_z", "null_mean", "null_sd",
            "null_z"} <= set(r.evidence["pattern"])


def test_samplewise_pattern_is_flagged(null: dict) -> None:
    x, y = _clean(31)
    xp, truth = _poison(x, y, _samplewise(y), 1.0)
    r = scan(xp, y, CFG, progress=False, null=null)
    assert r.poisoned and r.score >= 1
    assert _f1(r.flags, truth) >= 0.9


# --- the self-calibrated verdict: no null at all ---------------------------------------------------------------
S2 = 16


def _hard(seed: int, channels: int, n: int = 600) -> tuple[np.ndarray, np.ndarray]:
    """Clean images whose content alone is only partly separable (held-out naive Bayes ~40 %, linear ~80 %):
    four blob shapes that share most of their cells, shifted by up to 3 pixels, each image with its own
    brightness, tint, background and texture. Shapes fixed across seeds; fresh draws per seed."""
    base = np.random.default_rng(0).uniform(size=(4, 4, 4)) > 0.5
    common = np.random.default_rng(1).uniform(size=(4, 4)) > 0.5
    pick = np.random.default_rng(2).uniform(size=(4, 4, 4)) < 0.7
    shapes = np.kron(np.where(pick, common, base), np.ones((4, 4)))
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(4), n // 4)
    tint = rng.uniform(0.4, 1.0, (n, 1, 1, channels))
    x = rng.uniform(0, 40, (n, 1, 1, channels)) + np.zeros((n, S2, S2, channels))
    for i, c in enumerate(y):
        m = np.roll(shapes[c], tuple(rng.integers(-3, 4, size=2)), axis=(0, 1))
        x[i] += (m * rng.uniform(80, 200))[..., None] * tint[i] + rng.normal(0, 30, (S2, S2, channels))
    return np.clip(np.rint(x), 0, 255).astype(np.uint8), y


@pytest.mark.parametrize("channels", [1, 3])
def test_self_calibrated_verdict_without_any_null(channels: int) -> None:
    """No null for these geometries (16x16x1, 16x16x3): clean sets are judged clean by the paired test
    against their own content reference, and an 8/255 class-wise pattern on every image is flagged."""
    for seed in (20, 21):
        x, y = _hard(seed, channels)
        r = scan(x, y, CFG, seed=seed, progress=False, null={})
        assert not r.info["verdict"]["null_used"] and not r.poisoned and r.score < 1
        assert all(e["self_z"] < CFG.self_threshold for e in r.evidence.values())
    x, y = _hard(30, channels)
    r = scan(np.clip(x + _fine_pattern(channels)[y], 0, 255).astype(np.uint8), y, CFG, progress=False, null={})
    assert r.poisoned and r.score >= 1 and "self:linear" in r.info["verdict"]["fired"]
    e = r.evidence["linear"]  # the data is far easier than its content: beyond the margin by the threshold
    assert e["self_effect"] - e["self_margin"] >= CFG.self_threshold * e["self_sd"]
    assert "self:nb" not in r.info["verdict"]["tests"]  # nb: evidence only (exact values can be content)


def _fine_pattern(channels: int, amp: float = 8.0) -> np.ndarray:
    """A class-wise +-8/255 pattern of fine detail (a random sign per 2x2 block times a checkerboard): what an
    availability poison looks like, and what the content reference removes."""
    blocks = np.random.default_rng(5).choice([-amp, amp], size=(4, S2 // 2, S2 // 2, channels))
    return np.kron(blocks, np.array([[1.0, -1.0], [-1.0, 1.0]])[None, :, :, None])


def test_content_reference_removes_a_small_poison_and_keeps_the_content() -> None:
    from unpoison.scan import content_reference

    x, y = _hard(40, 3)
    xp = np.clip(x + _fine_pattern(3)[y], 0, 255).astype(np.uint8)
    rx, rp = content_reference(x).astype(float), content_reference(xp).astype(float)
    assert rx.shape == x.shape and rx.dtype == float and set(np.unique(rx)) <= {round(k * 255 / 7) for k in range(8)}
    # the poison (8 grey levels everywhere) mostly gone: the references differ far less than the images
    assert np.abs(rp - rx).mean() < 0.5 * np.abs(xp.astype(float) - x).mean()
    # the content kept: the images at half resolution (what 2x2 averaging keeps; the 8 levels round it)
    half = x.astype(float).reshape(len(x), S2 // 2, 2, S2 // 2, 2, 3).mean((2, 4))
    rhalf = rx.reshape(len(x), S2 // 2, 2, S2 // 2, 2, 3).mean((2, 4))
    assert np.corrcoef(rhalf.ravel(), half.ravel())[0, 1] > 0.95
    assert np.array_equal(content_reference(x), content_reference(x))  # no randomness


def test_clean_reference_path() -> None:
    """A small clean sample of the same kind (another draw): a poisoned set is flagged against it, a clean one
    is not; a reference of another geometry or with other classes is a one-line error."""
    from unpoison.errors import UserError

    xr, yr = _hard(50, 1, n=400)
    x, y = _hard(51, 1)
    r = scan(x, y, CFG, progress=False, null={}, clean_reference=(xr, yr))
    assert not r.poisoned and r.info["verdict"]["clean_reference"] == 400
    assert all("clean_z" in e for e in r.evidence.values())
    xp, _ = _poison(x, y, _fine_pattern(1)[y], 1.0)
    r = scan(xp, y, CFG, progress=False, null={}, clean_reference=(xr, yr))
    assert r.poisoned and any(t.startswith("clean:") for t in r.info["verdict"]["fired"])
    with pytest.raises(UserError, match="geometry|images"):
        scan(x, y, CFG, progress=False, null={}, clean_reference=(xr[:, :8], yr))
    with pytest.raises(UserError, match="labels the data has not"):
        scan(x, y, CFG, progress=False, null={}, clean_reference=(xr, yr + 1))


def test_scan_does_not_reseed_torch() -> None:
    """The scan runs inside a D-VAE fit (``p_refit=auto``): it must leave torch's global generator alone."""
    import torch

    torch.manual_seed(1234)
    torch.rand(3)
    before, init = torch.get_rng_state().clone(), torch.initial_seed()
    x, y = _hard(60, 3, n=200)
    scan(x, y, ScanConfig(signals=("nb", "linear", "pattern", "cnn"), cnn_min_steps=2, cnn_epochs=1),
         progress=False, null={}, clean_reference=_hard(61, 3, n=200), device="cpu")
    assert torch.initial_seed() == init and torch.equal(torch.get_rng_state(), before)


def test_detect_and_scan_share_one_implementation(null: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import unpoison.scan as scan_mod
    from unpoison.detect import detect

    monkeypatch.setattr(scan_mod, "load_null", lambda path=None: null)
    x, y = _clean(32)
    xp, _ = _poison(x, y, _classwise(y), 1.0)
    d = detect(xp, y, "signals", CFG, progress=False)
    s = scan(xp, y, CFG, progress=False)
    assert np.array_equal(d.flags, s.flags) and np.allclose(d.scores, s.sample_scores)
    assert d.info["scan"]["poisoned"] and d.info["n_flagged"] == int(s.flags.sum())


def _saved(tmp_path: Path, poisoned: bool) -> Path:
    x, y = _clean(33)
    if poisoned:
        x, _ = _poison(x, y, _classwise(y), 1.0)
    return save_dataset(ImageDataset(x, y, x[:16], y[:16]), tmp_path / ("p.npz" if poisoned else "c.npz"))


def test_cli_json_is_one_object_and_exit_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from unpoison.cli import main

    data = _saved(tmp_path, poisoned=True)
    assert main(["scan", str(data), "--json", "--signals", "nb,linear,pattern"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out["poisoned"], bool) and isinstance(out["score"], float)
    assert out["null_calibrated"] is False  # 12x12 images: the shipped null is Fashion-MNIST's...
    assert out["verdict"]["null_used"] is False and set(out["verdict"]["tests"]) == {  # ... the verdict is its own
        "self:linear", "self:pattern"}
    assert set(out["evidence"]) == {"nb", "linear", "pattern"}
    csv_out = tmp_path / "s.csv"
    assert main(["scan", str(data), "--samples", str(csv_out), "--quiet"]) == 0
    assert csv_out.read_text().splitlines()[0] == "index,label,score,flag"
    assert "wrote" in capsys.readouterr().out


def test_cli_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from unpoison.cli import main

    assert main(["scan", str(tmp_path / "missing.npz")]) == 2
    data = _saved(tmp_path, poisoned=False)
    assert main(["scan", str(data), "--threshold", "0"]) == 2
    assert main(["scan", str(data), "--signals", "nb,bogus"]) == 2
    assert main(["scan", str(data), "--samples", str(tmp_path / "s.txt")]) == 2
    assert main(["scan", "synthetic:n=16,size=8,classes=4"]) == 2  # too few images per class
    assert main(["scan", str(data), "--clean-reference", str(tmp_path / "nope.npz")]) == 2
    other = save_dataset(ImageDataset(*_hard(70, 3, n=200)), tmp_path / "rgb.npz")
    assert main(["scan", str(data), "--clean-reference", str(other)]) == 2  # another geometry
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("unpoison scan: error:") for line in err)


def test_bench_scan_kind_and_report(tmp_path: Path) -> None:
    from unpoison.cli import main

    out = tmp_path / "grid"
    assert main(["bench", "scan", str(out), "--preset", "smoke", "--report", "--quiet"]) == 0
    md = (out / "report" / "report.md").read_text()
    assert "Scan: is this dataset poisoned?" in md and "scan evidence" in md
    assert list(out.glob("cells/*/evidence.png")) and list((out / "report" / "figures").glob("scan-scores-*.png"))


def test_dvae_p_refit_auto_follows_the_scan() -> None:
    """``p_refit="auto"`` (the cpu preset's): the median refit on a set the scan finds poisoned, none on one it
    finds clean, on a geometry no null covers (the same verdict everywhere), and the fit's random stream is
    the one it would be without the scan (no reseed in the middle of the fit)."""
    import torch

    from unpoison.defenses import make_purifier

    def fit(x: np.ndarray, y: np.ndarray) -> tuple[dict, bool]:
        pur = make_purifier("dvae", preset="cpu", epochs=1, width=4, width1=4, latent=4, progress=False)
        pur.fit_purify(x, y)
        return pur.info_["p_refit"], all(bool(m.p_table_set) for m in pur.models_.values())

    x, y = _hard(80, 3)
    xp = np.clip(x + _fine_pattern(3)[y], 0, 255).astype(np.uint8)
    torch.manual_seed(99)
    info, refit = fit(x, y)
    assert info["setting"] == "auto" and info["applied"] == "none" and not refit
    assert info["scan"]["poisoned"] is False and "skipped" not in info["scan"]
    after_scan = torch.get_rng_state().clone()
    torch.manual_seed(99)
    pur = make_purifier("dvae", preset="cpu", epochs=1, width=4, width1=4, latent=4, p_refit="none", progress=False)
    pur.fit_purify(x, y)
    assert torch.equal(torch.get_rng_state(), after_scan)  # the same stream with and without the scan
    info, refit = fit(xp, y)
    assert info["applied"] == "median" and refit and info["scan"]["poisoned"] is True
    info, refit = fit(x[::15], y[::15])  # 40 images: too few to scan: the refit stays on, the reason given
    assert info["applied"] == "median" and "20 per class" in info["scan"]["skipped"]


def test_one_pixel_poison_on_half_of_each_class_is_found_exactly() -> None:
    """A one-pixel shortcut (OPS-like: per class an exact colour at one place) on half of each class: the
    per-sample flags are the images that carry it; a class pattern on a flat background is not taken for one."""
    from unpoison.scan import shared_values

    x, y = _hard(90, 3)
    truth = np.zeros(len(y), dtype=bool)
    truth[np.random.default_rng(1).permutation(len(y))[: len(y) // 2]] = True
    xp = x.copy()
    for c in range(4):
        m = truth & (y == c)
        xp[m, 2 + 3 * c, 5 + 2 * c] = [255, 0, 255][: 3] if c % 2 else [0, 255, 0]
    flags, info = shared_values(xp, y)
    assert info["all_enriched"] and _f1(flags, truth) >= 0.99
    flags, info = shared_values(x, y)
    assert not info["all_enriched"]
    g, yg = _clean(91)  # exact-zero background: a class pattern there repeats exact values at many places
    gp, _ = _poison(g, yg, _classwise(yg), 1.0)
    assert not shared_values(gp, yg)[1]["all_enriched"]
