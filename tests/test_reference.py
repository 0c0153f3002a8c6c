"""``unpoison purify --reference CLEAN``: every stage measured against the clean images, end to end.

The report's numbers are recomputed here by hand from what the run saved (``p_hat.npy``, the purified
dataset) with the :mod:`unpoison.disentangle` functions, so a wrong stage, subset or unit shows up.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from unpoison.data import load_dataset, make_synthetic, save_dataset
from unpoison.disentangle import (
    class_mean_corr,
    energy_removed,
    per_image_corr,
    poison_share,
    psnr_to,
    summary,
    true_perturbation,
)


def _pair(tmp_path: Path, every: int = 1) -> tuple[Path, Path, np.ndarray]:
    """clean.npz and pois.npz: a class-wise +-12 pattern added to every ``every``-th training image."""
    ds = make_synthetic(n=48, size=8, channels=1, classes=4, seed=3)
    rng = np.random.default_rng(1)
    pattern = rng.choice([-12, 12], size=(4, 8, 8, 1))
    idx = np.arange(0, len(ds.x_train), every)
    x = ds.x_train.astype(np.int16)
    x[idx] += pattern[ds.y_train[idx]]
    save_dataset(ds, tmp_path / "clean.npz")
    save_dataset(ds.replace(x_train=np.clip(x, 0, 255).astype(np.uint8)), tmp_path / "pois.npz")
    return tmp_path / "clean.npz", tmp_path / "pois.npz", idx


def _close(a: float | None, b: float) -> bool:
    return (a is None and math.isnan(b)) or (a is not None and a == pytest.approx(b, rel=1e-6, abs=1e-9))


def test_dvae_reference_numbers_equal_the_metrics_by_hand(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    clean, pois, _ = _pair(tmp_path)
    out = tmp_path / "out.npz"
    rc, stdout, err = run_cli("purify", pois, out, "--preset", "smoke", "--width", "4", "--latent", "8",
                              "--epochs", "1", "--device", "cpu", "--quiet", "--reference", clean, "--reference-test")
    assert rc == 0, err
    assert "corr(p_hat, p)" in stdout and "Table 1" in stdout
    rdir = tmp_path / "out.npz.report"
    rep = json.loads((rdir / "manifest.json").read_text())["reference"]
    x_clean, y = load_dataset(clean).x_train, load_dataset(clean).y_train
    x0, x_out = load_dataset(pois).x_train, load_dataset(out).x_train
    p_hat = np.load(rdir / "p_hat.npy")
    p = true_perturbation(x_clean, x0)
    a = rep["all"]
    assert rep["poisoned"] == {"n": 48, "of": 48, "n_differ": 48, "partial": False,
                               "source": "the images that differ from the clean ones"}
    assert "subset" not in rep  # every image is poisoned: no separate block
    # stage 1: p_hat against p
    corr = summary(per_image_corr(p_hat, p))
    for k in ("mean", "q25", "median", "q75"):
        assert _close(a["p_hat"]["corr"][k], corr[k])
    assert _close(a["p_hat"]["energy_removed"], energy_removed(p, p_hat)[0])
    assert _close(a["p_hat"]["share"], poison_share(p_hat, p)[0])
    for k, v in class_mean_corr(p, p_hat, y).items():
        assert _close(a["p_hat"]["class_corr"][str(k)], v)
    # stages in order; the input and the output recomputed from the saved data
    assert list(a["stages"]) == ["input", "after stage 1", "after stage 2 subtraction", "output"]
    assert a["stages"]["input"]["poison_left_share"] == pytest.approx(1.0)
    assert _close(a["stages"]["input"]["psnr_to_clean"], psnr_to(x_clean, x0))
    r = x_out.astype(np.float32) - x_clean.astype(np.float32)
    assert _close(a["stages"]["output"]["psnr_to_clean"], psnr_to(x_clean, x_out))
    assert _close(a["stages"]["output"]["poison_left_share"], poison_share(r, p)[0])
    assert _close(a["stages"]["output"]["poison_left_corr"]["mean"], summary(per_image_corr(r, p))["mean"])
    h = rep["headline"]
    assert _close(h["stage1_energy_removed"], energy_removed(p, p_hat)[0]) and _close(h["stage1_corr"], corr["mean"])
    # Table 1 ran with the smoke scoring protocol; accuracies are percentages
    t1 = rep["table1"]
    assert t1["scoring_preset"] == "smoke" and t1["test_split_of"] == "reference"
    assert all(0 <= t1[k] <= 100 for k in ("acc_clean_train", "acc_clean_test", "acc_poisoned_train"))
    # the report and the residual grid
    md = (rdir / "report.md").read_text()
    assert f"| all | output | {a['stages']['output']['psnr_to_clean']:.2f} |" in md
    assert f"{a['p_hat']['energy_removed']:.1%}" in md and "Table 1 check" in md
    assert (rdir / "residual.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a rerun without --reference: no stale residual grid, the report says nothing was measured
    rc, _, err = run_cli("purify", pois, out, "--method", "jpeg", "--quiet", "--overwrite")
    assert rc == 0, err
    assert not (rdir / "residual.png").exists() and "No --reference given" in (rdir / "report.md").read_text()
    assert json.loads((rdir / "manifest.json").read_text())["reference"] is None


def test_partial_poisoning_subset_and_a_method_without_p_hat(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    clean, pois, idx = _pair(tmp_path, every=3)
    out = tmp_path / "j.npz"
    rc, stdout, err = run_cli("purify", pois, out, "--method", "jpeg", "--quality", "30", "--quiet",
                              "--reference", clean)
    assert rc == 0, err
    assert "stage 1" not in stdout and "poison left in the output" in stdout
    rep = json.loads((tmp_path / "j.npz.report" / "manifest.json").read_text())["reference"]
    assert rep["poisoned"]["partial"] and rep["poisoned"]["n"] == len(idx) == 16
    x_clean, x0 = load_dataset(clean).x_train, load_dataset(pois).x_train
    x_out = load_dataset(out).x_train
    np.testing.assert_array_equal(np.flatnonzero((x0 != x_clean).reshape(48, -1).any(1)), idx)
    for block, sel in (("all", np.arange(48)), ("subset", idx)):
        b = rep[block]
        assert b["n"] == len(sel) and "p_hat" not in b  # jpeg has no p_hat: what applies only
        p = true_perturbation(x_clean[sel], x0[sel])
        r = x_out[sel].astype(np.float32) - x_clean[sel].astype(np.float32)
        assert list(b["stages"]) == ["input", "output"]
        assert _close(b["stages"]["output"]["psnr_to_clean"], psnr_to(x_clean[sel], x_out[sel]))
        assert _close(b["stages"]["output"]["poison_left_share"], poison_share(r, p)[0])
    # the unpoisoned images count in "all" (PSNR) but not in the subset: the two PSNRs differ
    assert rep["all"]["stages"]["input"]["psnr_to_clean"] > rep["subset"]["stages"]["input"]["psnr_to_clean"]
    md = (tmp_path / "j.npz.report" / "report.md").read_text()
    assert "| subset | output |" in md and "Stage 1" not in md
    assert (tmp_path / "j.npz.report" / "residual.png").exists()


def _refused(run_cli, argv: list[object], needle: str, out: Path, names: str = "") -> None:  # type: ignore[no-untyped-def]
    rc, _, err = run_cli(*argv)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0] and names in lines[0], lines[0]
    assert not out.exists() and not out.with_name(out.name + ".report").exists()


@pytest.mark.parametrize("change, needle", [
    ("labels", "labels differ from the input's at 1 of 48 images (first at index 5"),
    ("count", "training split has 47 images, the input's has 48"),
    ("shape", "training images are 4x8x1, the input's are 8x8x1"),
])
def test_a_mismatched_reference_is_refused_before_any_work(tmp_path: Path, run_cli, change: str,  # type: ignore[no-untyped-def]
                                                           needle: str) -> None:
    clean, pois, _ = _pair(tmp_path)
    ds = load_dataset(clean)
    if change == "labels":
        y = ds.y_train.copy()
        y[5] = (y[5] + 1) % 4
        bad = ds.replace(y_train=y)
    elif change == "count":
        bad = ds.replace(x_train=ds.x_train[:-1], y_train=ds.y_train[:-1])
    else:
        bad = ds.replace(x_train=ds.x_train[:, :4], x_test=ds.x_test[:, :4])
    save_dataset(bad, tmp_path / "bad.npz")
    out = tmp_path / "o.npz"
    _refused(run_cli, ["purify", pois, out, "--method", "jpeg", "--quiet", "--reference", tmp_path / "bad.npz"],
             needle, out, names="bad.npz")


def test_reference_flag_misuse_is_refused(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    clean, pois, _ = _pair(tmp_path)
    out = tmp_path / "o.npz"
    _refused(run_cli, ["purify", pois, out, "--method", "jpeg", "--reference-test"], "needs --reference CLEAN", out)
    _refused(run_cli, ["purify", pois, out, "--method", "jpeg", "--reference", clean, "--reference-test"],
             "--method jpeg has none", out)
    _refused(run_cli, ["purify", pois, out, "--skip-stage1", "true", "--preset", "smoke", "--reference", clean,
                       "--reference-test", "--device", "cpu"], "with --skip-stage1 true has none", out)
    # OUT may not be the reference (it would be replaced by the purified set)
    before = clean.read_bytes()
    rc, _, err = run_cli("purify", pois, clean, "--method", "jpeg", "--overwrite", "--reference", clean)
    assert rc == 2 and "is the input" in err and clean.read_bytes() == before
