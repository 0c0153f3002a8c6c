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


def test_reference_problem_and_poisoned_indices() -> None:
    from unpoison.disentangle import poisoned_indices, reference_problem

    x = np.zeros((4, 2, 2, 1), np.uint8)
    y = np.array([0, 1, 0, 1])
    assert reference_problem(x, y, x.copy(), y.copy()) is None
    assert "3 images, the input's has 4" in reference_problem(x[:3], y[:3], x, y)
    assert "2x2x1, the input's are 2x1x1" in reference_problem(x, y, x[:, :, :1], y)
    y2 = y.copy()
    y2[2] = 1
    assert "at 1 of 4 images (first at index 2: 0 vs 1)" in reference_problem(x, y, x, y2)
    x0 = x.copy()
    x0[1, 1, 0, 0] = 3
    x0[3, 0, 1, 0] = 1
    assert poisoned_indices(x, x0).tolist() == [1, 3]


def test_purification_report_subset_headline_and_markdown() -> None:
    from unpoison.disentangle import headline, purification_report, report_markdown

    x_clean = np.full((4, 1, 2, 1), 100, np.uint8)
    x0 = x_clean.copy()
    x0[[0, 2], 0, 0, 0] = 110  # partial: 2 of 4 poisoned
    p_hat = np.zeros((4, 1, 2, 1), np.float32)
    p_hat[0, 0, 0, 0] = 10.0  # exact on image 0; image 2 keeps all its poison
    x_out = x_clean.copy()
    x_out[2, 0, 0, 0] = 105  # half of image 2's poison left in the output
    rep = purification_report(x_clean, x0, x_out, {"after stage 1": x0}, p_hat, np.array([0, 1, 0, 1]))
    assert rep["poisoned"]["partial"] and rep["poisoned"]["n"] == 2 and rep["subset"]["n"] == 2
    assert list(rep["all"]["stages"]) == ["input", "after stage 1", "output"]
    assert rep["subset"]["p_hat"]["energy_removed"] == pytest.approx(1 - 100 / 200)
    assert rep["subset"]["stages"]["output"]["poison_left_share"] == pytest.approx(50 / 200)
    # PSNR over the subset sees only the poisoned images: lower than over all
    assert rep["subset"]["stages"]["input"]["psnr_to_clean"] < rep["all"]["stages"]["input"]["psnr_to_clean"]
    h = headline(rep)
    assert h["stage1_energy_removed"] == pytest.approx(0.5) and h["poison_left"] == pytest.approx(0.25)
    assert h["stage1_corr"] == pytest.approx(1.0)  # image 0 exact; image 2's p_hat is constant (left out)
    md = report_markdown(rep)
    assert "| subset | output | " in md and "| all | 4 | 1.000 |" in md and "50.0%" in md
    # given indices override the difference (an attack's own record)
    rep2 = purification_report(x_clean, x0, x_out, p_hat=p_hat, subset=[0])
    assert rep2["subset"]["n"] == 1 and rep2["poisoned"]["source"] == "the poisoned indices given"
    # no p_hat and nothing poisoned: what applies, no subset, None where undefined
    rep3 = purification_report(x_clean, x_clean, x_out)
    assert "subset" not in rep3 and "p_hat" not in rep3["all"] and headline(rep3)["poison_left"] is None


def test_residual_grid_without_p_hat_and_with_left_rows() -> None:
    p = np.zeros((2, 2, 2, 1), np.float32)
    p[:, 0, 0, 0] = 4.0
    rows = residual_grid_rows(p, None, n=2, left={"output - clean": p / 4})
    assert list(rows) == ["p (true)", "output - clean"]
    assert rows["output - clean"][0, 0, 0, 0] == int(127.5 + 127 / 4 * 1.0)  # the same gain as p's row
