"""``unpoison scan``: the verdict on tiny synthetic data (clean / class-wise / sample-wise additive poisons,
against a null calibrated here on clean synthetic sets), its JSON, bad input, and detect sharing the code."""

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
        assert r.info["calibrated"]
        assert not r.poisoned and r.score < CFG.threshold and r.kind is None
        assert not r.flags.any()


def test_classwise_pattern_is_flagged_and_found(null: dict) -> None:
    x, y = _clean(30)
    xp, truth = _poison(x, y, _classwise(y), 1.0)
    r = scan(xp, y, CFG, progress=False, null=null)
    assert r.poisoned and r.score >= CFG.threshold and r.kind == "class-wise"
    assert _f1(r.flags, truth) >= 0.9  # all poisoned: the split must not cut off a "clean" half
    # the evidence names each signal's statistic and its z against the null
    assert {"stat", "z", "null_mean", "null_sd"} <= set(r.evidence["pattern"])


def test_samplewise_pattern_is_flagged(null: dict) -> None:
    x, y = _clean(31)
    xp, truth = _poison(x, y, _samplewise(y), 1.0)
    r = scan(xp, y, CFG, progress=False, null=null)
    assert r.poisoned and r.score >= CFG.threshold
    assert _f1(r.flags, truth) >= 0.9


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
    assert out["calibrated"] is False  # 12x12 images: the shipped null is Fashion-MNIST's
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
    err = capsys.readouterr().err.strip().splitlines()
    assert err and all(line.startswith("unpoison scan: error:") for line in err)


def test_bench_scan_kind_and_report(tmp_path: Path) -> None:
    from unpoison.cli import main

    out = tmp_path / "grid"
    assert main(["bench", "scan", str(out), "--preset", "smoke", "--report", "--quiet"]) == 0
    md = (out / "report" / "report.md").read_text()
    assert "Scan: is this dataset poisoned?" in md and "scan evidence" in md
    assert list(out.glob("cells/*/evidence.png")) and list((out / "report" / "figures").glob("scan-scores-*.png"))


def test_dvae_p_refit_auto_follows_the_scan(null: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """``p_refit="auto"`` (the cpu preset's): the median refit on a set the scan finds poisoned, none on one it
    finds clean, and the median (the scan skipped, the reason given) where the null does not cover the images."""
    import unpoison.scan as scan_mod
    from unpoison.defenses import make_purifier
    from unpoison.scan import calibrated_for

    def fit(x: np.ndarray, y: np.ndarray) -> tuple[dict, bool]:
        pur = make_purifier("dvae", preset="cpu", epochs=1, width=4, width1=4, latent=4, progress=False)
        pur.fit_purify(x, y)
        return pur.info_["p_refit"], all(bool(m.p_table_set) for m in pur.models_.values())

    x, y = _clean(40)
    xp, _ = _poison(x, y, _classwise(y), 1.0)
    info, refit = fit(x, y)  # the shipped null is Fashion-MNIST's: 12x12 images are not covered
    assert info["applied"] == "median" and refit and "no clean null for 12x12x1" in info["scan"]["skipped"]
    monkeypatch.setattr(scan_mod, "load_null", lambda path=None: null)
    assert calibrated_for(x.shape, 4) is None and "sizes" in calibrated_for((4 * N, SIZE, SIZE, 1), 4)
    assert "20 per class" in calibrated_for((40, SIZE, SIZE, 1), 4)
    info, refit = fit(x, y)
    assert info["setting"] == "auto" and info["applied"] == "none" and not refit
    assert info["scan"]["poisoned"] is False
    info, refit = fit(xp, y)
    assert info["applied"] == "median" and refit and info["scan"]["poisoned"] is True
