"""The prepared device check: its ``--dry`` rehearsal runs every section on CPU, and its runner fails soft
and keeps to its time budget."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
SECTIONS = ["env", "dvae_speed", "two_stage", "scoring", "resume", "attacks", "avatar"]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["gpu_check"] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop("gpu_check", None)


def test_dry_run_writes_the_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    t0 = time.monotonic()
    # generous budget: CI machines are shared; the run itself takes ~20 s of sections here
    p = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--out", str(out), "--budget-s", "150"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    wall = time.monotonic() - t0
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:])
    data = json.loads((out / "gpu_check.json").read_text())
    sec = data["sections"]
    assert list(sec) == SECTIONS and all(sec[s]["status"] == "ok" for s in SECTIONS), {
        k: v.get("error") for k, v in sec.items()}
    assert data["meta"]["dry"] is True and data["meta"]["complete"] is True
    assert sum(v["seconds"] for v in sec.values()) < 60, "the dry sections must take under a minute"
    d = sec["dvae_speed"]["results"]
    assert d["product"]["train"]["img_s"] > 0 and d["reference"]["infer"]["img_s"] > 0
    assert d["reference"]["accel"] == {"bf16": False, "fused_adam": False, "compile": False,
                                       "channels_last": False, "infer_batch": 256, "bf16_infer": None}
    two = sec["two_stage"]["results"]
    assert two["epochs_run"] == 2 and two["epochs_preset"] == 60
    assert two["extrapolated_total_s"] > two["fit_s"]  # 60 epochs a stage take longer than the 2 run
    assert sec["resume"]["results"]["bit_exact"] is True  # CPU, one thread: exact
    assert sec["resume"]["results"]["epochs_run_after_resume"] == ["stage1 2", "stage2 1", "stage2 2"]
    assert set(sec["attacks"]["results"]) == {"em", "rem", "tap", "sep", "ntga"}
    assert all(v["step_s"] > 0 for v in sec["attacks"]["results"].values())
    assert sec["avatar"]["results"]["sample"]["img_s"] > 0
    md = (out / "README.md").read_text()
    assert "DRY RUN" in md and "EXTRAPOLATED" in md and "| two_stage | ok |" in md
    assert "section" in p.stdout and "EXTRAPOLATED" in p.stdout  # the printed table
    print(f"dry run: {wall:.1f} s wall, sections {sum(v['seconds'] for v in sec.values()):.1f} s")


def test_dry_default_output_is_not_the_results_folder(gpu_check) -> None:
    d = gpu_check.default_out(dry=True)
    try:
        assert d.exists() and "docs" not in d.parts and d != gpu_check.FULL_OUT
        assert gpu_check.default_out(dry=False) == ROOT / "docs" / "results" / "gpu"
    finally:
        d.rmdir()


def test_sections_fail_soft_and_keep_to_the_budget(gpu_check, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """No wall-clock window: the budget runs out on an event (the run_sections clock jumps past the deadline
    once ``slow`` is recorded), and the cap is shown by a 300 s sleep cut at 1.5 s (any bound well below
    300 s proves the cut, however busy the machine)."""
    real = time.monotonic
    jump = [0.0]

    class Clock:  # what run_sections reads as time.monotonic (only inside gpu_check)
        @staticmethod
        def monotonic() -> float:
            return real() + jump[0]

    monkeypatch.setattr(gpu_check, "time", Clock)

    def ok(c):
        c.out["x"] = 1

    def boom(c):
        c.out["partial"] = True
        raise ValueError("deliberate")

    def slow(c):
        c.out["started"] = True
        time.sleep(300)

    def late(c):
        raise AssertionError("must not run: no time left")

    calls = []

    def done(r):
        calls.append(list(r))
        if "slow" in r:
            jump[0] = 10_000.0  # the budget is spent

    res = gpu_check.run_sections({"ok": ok, "boom": boom, "slow": slow, "late": late},
                                 lambda name: gpu_check.Ctx(None, gpu_check.DRY, Path("."), True),
                                 {"slow": 1.5}, deadline=Clock.monotonic() + 3600, on_done=done, min_start_s=1.8)
    assert res["ok"]["status"] == "ok" and res["ok"]["results"] == {"x": 1}
    assert res["boom"]["status"] == "failed" and "ValueError: deliberate" in res["boom"]["error"]
    assert res["boom"]["results"] == {"partial": True}  # what a failing section measured is kept
    assert res["slow"]["status"] == "timeout" and res["slow"]["results"] == {"started": True}
    assert 1.4 <= res["slow"]["seconds"] < 150
    assert res["late"]["status"] == "skipped"
    assert calls == [["ok"], ["ok", "boom"], ["ok", "boom", "slow"], ["ok", "boom", "slow", "late"]]
    rows = gpu_check.summary_rows(res)
    assert [r[1] for r in rows] == ["ok", "failed", "timeout", "skipped"] and "TIMEOUT" in rows[2][2]
