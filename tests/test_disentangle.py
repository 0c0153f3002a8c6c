"""Disentanglement metrics against hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from unpoison.disentangle import (
    class_mean_corr,
    disentangle_report,
    energy_removed,
    per_image_corr,
    poison_share,
    psnr_to,
    report_rows,
    residual_grid_rows,
    save_residual_grid,
    summary,
    true_perturbation,
)


def _imgs(*rows: list[float]) -> np.ndarray:
    """Each row one 1 x len x 1 image (NHWC)."""
    return np.asarray(rows, dtype=np.float32)[:, None, :, None]


def test_per_image_corr() -> None:
    a = _imgs([1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4])
    b = _imgs([2, 4, 6, 8], [4, 3, 2, 1], [1, 0, 0, 1], [5, 5, 5, 5])
    c = per_image_corr(a, b)
    assert c[0] == pytest.approx(1.0) and c[1] == pytest.approx(-1.0)
    assert c[2] == pytest.approx(0.0)  # centred: (-1.5,-.5,.5,1.5).(.5,-.5,-.5,.5) = 0
    assert math.isnan(c[3])  # constant image: no correlation
    # an offset does not change a correlation
    assert per_image_corr(a[:1], a[:1] + 7)[0] == pytest.approx(1.0)


def test_energy_removed_and_share() -> None:
    p = _imgs([3, 4], [0, 0])
    p_hat = _imgs([3, 0], [1, 0])
    agg, per = energy_removed(p, p_hat)
    assert per[0] == pytest.approx(1 - 16 / 25) and math.isnan(per[1])
    assert agg == pytest.approx(1 - (16 + 1) / 25)  # the error on the unpoisoned image counts in the aggregate
    assert energy_removed(p[:1], np.zeros_like(p[:1]))[0] == 0.0  # p_hat = 0 removes nothing
    assert energy_removed(p[:1], 3 * p[:1])[0] == pytest.approx(1 - 4)  # overshoot adds error
    share, sper = poison_share(p_hat, p)
    assert sper[0] == pytest.approx(9 / 25) and math.isnan(sper[1]) and share == pytest.approx(9 / 25)


def test_class_mean_corr_and_psnr() -> None:
    p = _imgs([1, -1], [3, -3], [1, 1], [-1, 2])
    p_hat = _imgs([2, 0], [0, -2], [0, 0], [0, 0])
    cc = class_mean_corr(p, p_hat, np.array([0, 0, 1, 1]))
    assert cc[0] == pytest.approx(1.0)  # means (2,-2) and (1,-1)
    assert math.isnan(cc[1])  # class 1's p_hat mean is constant
    a = np.zeros((1, 2, 2, 1), np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 255
    assert psnr_to(a, b) == pytest.approx(10 * math.log10(4))  # mse 1/4
    assert psnr_to(a, a) == float("inf")


def test_summary_quartiles() -> None:
    s = summary(np.array([4.0, 1.0, np.nan, 3.0, 2.0]))
    assert s == {"mean": 2.5, "q25": 1.75, "median": 2.5, "q75": 3.25, "n": 4}
    assert summary(np.array([np.nan]))["n"] == 0


def test_report_uses_the_stored_perturbation() -> None:
    """p is what the uint8 data holds: a +10 pattern clipped at 255 counts as +5 there."""
    x_clean = np.array([[[[250], [100]]], [[[10], [20]]], [[[30], [40]]]], dtype=np.uint8)  # 3 x 1 x 2 x 1
    x0 = x_clean.copy()
    x0[0] = [[[255], [110]]]  # +10 clipped to +5 at the first pixel
    x0[1] = [[[20], [10]]]
    assert true_perturbation(x_clean, x0)[0].ravel().tolist() == [5.0, 10.0]
    p_hat = np.zeros_like(x0, dtype=np.float32)
    p_hat[0] = [[[5], [10]]]  # exact on image 0, nothing on image 1
    x1 = (x0.astype(np.int16) - np.rint(p_hat)).clip(0, 255).astype(np.uint8)
    rep = disentangle_report(x_clean, x0, p_hat, {"input": x0, "after stage 1": x1}, y=np.array([0, 1, 1]),
                             subset=[0, 1])
    json.dumps(rep)  # JSON-able (NaN is allowed by json)
    a = rep["all"]
    # energy: image 0 exact (0 error of 125), image 1 all left (200), image 2 has no poison
    assert a["p_hat"]["energy_removed"] == pytest.approx(1 - 200 / 325)
    assert a["p_hat"]["corr"]["n"] == 1 and a["p_hat"]["corr"]["mean"] == pytest.approx(1.0)
    assert a["stages"]["input"]["poison_left_share"] == pytest.approx(1.0)
    assert a["stages"]["after stage 1"]["poison_left_share"] == pytest.approx(200 / 325)
    assert a["stages"]["after stage 1"]["psnr_to_clean"] == pytest.approx(psnr_to(x_clean, x1))
    assert a["p_l2"]["mean"] == pytest.approx((math.sqrt(125) + math.sqrt(200)) / 3 / 255)  # image 2: p = 0
    s = rep["subset"]
    assert s["n"] == 2 and s["p_hat"]["energy_removed"] == pytest.approx(1 - 200 / 325)
    assert s["p_l2"]["mean"] == pytest.approx((math.sqrt(125) + math.sqrt(200)) / 2 / 255)
    rows = report_rows(rep)
    assert [r["stage"] for r in rows] == ["stage-1 p_hat", "input", "after stage 1"] * 2
    with pytest.raises(ValueError, match="shape"):
        disentangle_report(x_clean, x0, p_hat[:2])


def test_residual_grid(tmp_path) -> None:
    p = np.zeros((3, 4, 4, 1), np.float32)
    p[:, 0, 0, 0] = 8.0
    p_hat = p / 2
    rows = residual_grid_rows(p, p_hat, n=2, x0=np.zeros((3, 4, 4, 1), np.uint8))
    assert list(rows) == ["poisoned x0", "p (true)", "p_hat (stage 1)", "p - p_hat"]
    assert all(r.dtype == np.uint8 and r.shape == (2, 4, 4, 1) for r in rows.values())
    # one shared gain (127/8): p's peak at the top, p_hat and p - p_hat both half way up, zero at mid-grey
    assert rows["p (true)"][0, 0, 0, 0] == 254 and rows["p_hat (stage 1)"][0, 0, 0, 0] == 191
    assert rows["p - p_hat"][0, 0, 0, 0] == 191 and rows["p (true)"][0, 1, 1, 0] == 127
    out = save_residual_grid(p, p_hat, tmp_path / "grid.png", n=2)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
