"""The benchmark machinery: grids, the results store, resume, failures, executors, report, Theorem 2."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from unpoison.bench import expand, load_config, run_grid, shipped_configs
from unpoison.bench.grid import Cell, fingerprint
from unpoison.bench.store import Store
from unpoison.bench.theorem2 import bounds, check_theorem2, kld_mixture_vs_normal
from unpoison.cli import main
from unpoison.errors import UserError

DATA = "synthetic:n=64,size=8,channels=3,classes=4,seed=0"

# Fakes, imported by every worker through the config's ``plugins`` (so spawned processes and Ray see them):
# ``test-fail`` always raises; ``test-crash`` kills its whole process the first time (after saving a
# checkpoint) and resumes from that checkpoint the next time.
PLUGIN = '''
import json, os, signal
from pathlib import Path
from typing import Any
import numpy as np
from unpoison.defenses.base import DEFENSES, Purifier
from unpoison.tags import Tags

if "test-fail" not in DEFENSES:
    @DEFENSES.register("test-fail", "always raises")
    class Fail(Purifier):
        name = "test-fail"
        def _transform(self, x, y):
            raise RuntimeError("deliberate failure")

    @DEFENSES.register("test-crash", "dies once mid-cell, then resumes from its checkpoint")
    class Crash(Purifier):
        name = "test-crash"
        tags = Tags(checkpoint=True)
        def __init__(self, checkpoint_dir=None, resume=False):
            super().__init__()
            self.ckpt = Path(checkpoint_dir) / "state.json"
            self.resume = resume
        def _transform(self, x, y):
            if self.resume and self.ckpt.exists():
                self.info_ = {"resumed_from": json.loads(self.ckpt.read_text())["step"]}
                return x
            self.ckpt.parent.mkdir(parents=True, exist_ok=True)
            self.ckpt.write_text(json.dumps({"step": 7}))
            os.kill(os.getpid(), signal.SIGKILL)
'''


@pytest.fixture(scope="session")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> str:
    p = tmp_path_factory.mktemp("plugin") / "fakes.py"
    p.write_text(PLUGIN)
    return str(p)


def write_cfg(path: Path, plugin: str, defenses: list, **extra: object) -> Path:
    cfg = {"name": "t", "kind": "purify", "plugins": [plugin],
           "axes": {"dataset": [DATA], "attack": ["none"], "defense": defenses, "model": ["tinycnn"]},
           "train": {"preset": "smoke", "epochs": 1}, **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


def rows(outdir: Path) -> dict[str, dict]:
    s = Store.open_existing(outdir)
    try:
        return {r["config"]["defense"]["label"]: r for r in s.rows()}
    finally:
        s.close()


def test_shipped_configs_expand_and_presets_validate() -> None:
    names = shipped_configs()
    for want in ("table2", "ablation", "kld-sweep", "jpeg-sweep", "disentangle-check", "detect", "partial",
                 "amplify", "theorem2"):
        assert want in names
    for name in names:
        for preset in ("smoke", "cpu", "paper"):
            cells = expand(load_config(name, preset))
            assert cells and len({c.key for c in cells}) == len(cells)
    t2 = expand(load_config("table2", "paper"))
    purify = [c for c in t2 if c.config["kind"] == "purify"]
    assert len(purify) == 9 * 8  # 9 attack rows x 8 defense columns, as in the paper
    # AVATAR has no checkpoint in the config: one dependency cell trains its DDPM, and the AVATAR cells need it
    deps = [c for c in t2 if c.config["kind"] == "train-diffusion"]
    assert len(deps) == 1 and deps[0].config["diffusion"] == {"preset": "paper"}
    avatar = [c for c in purify if c.config["defense"]["name"] == "avatar"]
    assert len(avatar) == 9 and all(c.config["needs"] == [deps[0].key] for c in avatar)
    assert all("needs" not in c.config for c in purify if c.config["defense"]["name"] != "avatar")
    assert fingerprint(t2) == fingerprint(expand(load_config("table2", "paper")))
    assert fingerprint(t2) != fingerprint(expand(load_config("table2", "cpu")))


def test_failing_cell_is_recorded_and_grid_goes_on(tmp_path: Path, plugin: str) -> None:
    cfg = write_cfg(tmp_path / "g.yaml", plugin, ["test-fail", "none", {"name": "jpeg", "params": {"quality": 30}}])
    counts = run_grid(str(cfg), tmp_path / "out", progress=False, allow_plugins=True)
    assert counts["failed"] == 1 and counts["done"] == 2
    r = rows(tmp_path / "out")
    assert "RuntimeError: deliberate failure" in r["test-fail"]["error"]
    assert r["none"]["final_acc"] is not None and 0 <= r["none"]["final_acc"] <= 100
    assert r["jpeg(quality=30)"]["psnr"] > 10
    man = json.loads((tmp_path / "out" / "cells" / r["none"]["cell_id"] / "manifest.json").read_text())
    assert man["status"] == "done" and man["seed"] == 0 and "versions" in man


def test_resume_after_grid_killed_mid_cell(tmp_path: Path, plugin: str) -> None:
    cfg = write_cfg(tmp_path / "g.yaml", plugin, ["none", "test-crash", "gray"])
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", "import sys; from unpoison.cli import main; sys.exit(main())", "bench", str(cfg),
           str(out), "--quiet", "--allow-plugins"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == -9, first.stderr[-500:]  # the whole grid died inside the second cell
    r = rows(out)
    assert r["none"]["status"] == "done" and r["test-crash"]["status"] == "running"
    assert r["gray"]["status"] == "pending"
    done_at = r["none"]["finished"]
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-500:]
    r = rows(out)
    assert all(v["status"] == "done" for v in r.values())
    assert r["none"]["attempts"] == 1 and r["none"]["finished"] == done_at  # finished cell skipped
    assert r["test-crash"]["attempts"] == 2
    assert r["test-crash"]["results"]["defense_info"] == {"resumed_from": 7}  # resumed its own checkpoint


def test_ray_executor_runs_two_cells(tmp_path: Path, plugin: str) -> None:
    ray = pytest.importorskip("ray")
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"Ray cannot start here: {e}")
    try:
        cfg = write_cfg(tmp_path / "g.yaml", plugin, ["none", "test-fail"])
        counts = run_grid(str(cfg), tmp_path / "out", executor="ray", progress=False, allow_plugins=True)
    finally:
        ray.shutdown()
    assert counts["done"] == 1 and counts["failed"] == 1
    assert "deliberate failure" in rows(tmp_path / "out")["test-fail"]["error"]


def _fixture_store(outdir: Path) -> None:
    cfg = load_config("table2", "paper")
    cells = [c for c in expand(cfg) if c.config["attack"]["name"] in ("none", "em", "lsp")
             and c.config["defense"]["name"] in ("none", "jpeg", "dvae")]
    store = Store.create_or_open(outdir, fingerprint(cells), cells, cfg)
    for i, c in enumerate(cells):
        if c.config["attack"]["name"] == "lsp" and c.config["defense"]["name"] == "dvae":
            store.record(c.key, {"status": "failed", "error": "ValueError: boom\ntrace"})
            continue
        acc = 10.0 + i
        store.record(c.key, {"status": "done", "results": {"final_acc": acc, "best_acc": acc, "psnr": 20.0 + i},
                             "timings": {"total": 1.0}})
    store.close()


def test_report_from_fixture_store(tmp_path: Path) -> None:
    _fixture_store(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    rdir = tmp_path / "report"
    md = (rdir / "report.md").read_text()
    assert "| attack \\\\ defense | none | JPEG-10 | dvae |" in md  # markup escaped: renders as one backslash
    assert "10.00 (94.57)" in md  # clean/none: ours beside the paper's CIFAR-10 number
    assert "(91.42)" in md and "failed" in md and "ValueError: boom" in md
    csvs = sorted(p.name for p in (rdir / "tables").glob("*.csv"))
    assert any(n.startswith("table2-") for n in csvs) and "failed.csv" in csvs
    page = (rdir / "index.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and "<table>" in page
    assert (rdir / "figures").glob("psnr-acc-*.png")


def test_theorem2_holds_numerically() -> None:
    res = check_theorem2()
    assert res["all_hold"] and res["kld_increasing_in_r"]
    # the numerical KLD agrees with a Monte-Carlo estimate (independent of the quadrature)
    rng = np.random.default_rng(0)
    for r in (0.7, 3.0):
        s = 1 / math.sqrt(1 + r * r)
        v = rng.normal(np.where(rng.random(400_000) < 0.5, -r * s, r * s), s)
        logp = np.log(0.5 * (np.exp(-((v + r * s) ** 2) / (2 * s * s)) + np.exp(-((v - r * s) ** 2) / (2 * s * s)))
                      / (s * math.sqrt(2 * math.pi)))
        logq = -(v**2) / 2 - 0.5 * math.log(2 * math.pi)
        assert abs(np.mean(logp - logq) - kld_mixture_vs_normal(r)) < 0.01
        lo, up = bounds(r)
        assert lo <= kld_mixture_vs_normal(r) <= up


def test_bad_inputs_one_line_exit_2_store_untouched(tmp_path: Path, plugin: str, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    bad = write_cfg(tmp_path / "bad.yaml", plugin, ["no-such-defense"])
    assert main(["bench", str(bad), str(out), "--quiet", "--allow-plugins"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown defense 'no-such-defense'" in err and not out.exists()
    bad.write_text(yaml.safe_dump({"axes": {"attack": ["nope"]}}))
    assert main(["bench", str(bad), str(out), "--quiet"]) == 2 and "unknown attack 'nope'" in capsys.readouterr().err
    bad.write_text(yaml.safe_dump({"axes": {"dataset": ["nosuch:thing"]}}))
    assert main(["bench", str(bad), str(out)]) == 2 and "unknown dataset" in capsys.readouterr().err
    bad.write_text("axes: [unclosed")
    assert main(["bench", str(bad), str(out)]) == 2 and "not valid YAML" in capsys.readouterr().err
    bad.write_text(yaml.safe_dump({"axes": {"seed": [0]}, "typo_key": 1}))
    assert main(["bench", str(bad), str(out)]) == 2 and "unknown config key" in capsys.readouterr().err
    assert main(["bench", "no-such-config", str(out)]) == 2 and not out.exists()
    assert main(["report", str(out)]) == 2
    # an OUTDIR holding another grid, then a store from an incompatible version: refused, bytes unchanged
    assert main(["bench", "theorem2", str(out), "--quiet"]) == 0
    db = out / "results.sqlite"
    before = db.read_bytes()
    other = write_cfg(tmp_path / "other.yaml", plugin, ["none"])
    capsys.readouterr()
    assert main(["bench", str(other), str(out), "--quiet", "--allow-plugins"]) == 2
    assert "another grid" in capsys.readouterr().err and db.read_bytes() == before
    con = sqlite3.connect(db)
    con.execute("UPDATE meta SET value='999' WHERE key='schema_version'")
    con.commit()
    con.close()
    before = db.read_bytes()
    assert main(["bench", "theorem2", str(out), "--quiet"]) == 2
    assert "schema version 999" in capsys.readouterr().err and db.read_bytes() == before
    with pytest.raises(UserError, match="two cells share"):
        expand({"axes": {"defense": ["jpeg", {"name": "jpeg"}]}})


def test_theorem2_grid_and_cell_ids_stable(tmp_path: Path) -> None:
    assert main(["bench", "theorem2", str(tmp_path), "--quiet", "--report"]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "all hold: True" in md and (tmp_path / "report" / "figures" / "theorem2.png").exists()
    c = Cell(key="k", index=0, config={"a": 1})
    assert c.id == Cell(key="other", index=3, config={"a": 1}).id


@pytest.mark.skipif("dvae" not in __import__("unpoison.defenses", fromlist=["DEFENSES"]).DEFENSES,
                    reason="dvae purifier not registered yet")
def test_smoke_preset_of_table2_runs(tmp_path: Path) -> None:
    """The shipped smoke preset end to end (real attack, JPEG, D-VAE), as CI runs it."""
    assert main(["bench", "table2", str(tmp_path), "--preset", "smoke", "--quiet", "--report"]) == 0
    r = Store.open_existing(tmp_path)
    try:
        assert r.status_counts()["done"] == 6
    finally:
        r.close()
    assert (tmp_path / "report" / "index.html").exists()


@pytest.mark.slow
def test_smoke_preset_of_adaptive_runs(tmp_path: Path) -> None:
    """Issue 25's grid end to end at its smoke size: the purification-aware attacks (em-adaptive with its own
    D-VAE) x every defense, the report with the stage-by-stage tables (about 45 s on one thread)."""
    assert main(["bench", "adaptive", str(tmp_path), "--preset", "smoke", "--quiet", "--report"]) == 0
    r = Store.open_existing(tmp_path)
    try:
        assert r.status_counts()["done"] == 5 * 7
        attacks = {row["config"]["attack"]["name"] for row in r.rows()}
    finally:
        r.close()
    assert attacks == {"none", "em", "em-smooth", "colorshift", "em-adaptive"}
    assert "Every stage against the clean images" in (tmp_path / "report" / "report.md").read_text()


# --- every kind, the multi-process executor, content keys, plugins, the check, the report's escaping --------
TINY = "synthetic:n=48,size=8,channels=3,classes=4,seed=0"


def test_every_kind_runs_in_worker_processes(tmp_path: Path) -> None:
    """One grid with a cell of each data kind, run by the local executor in two spawned worker processes."""
    cfg = {"name": "kinds", "axes": {"dataset": [TINY], "kind": ["purify", "disentangle-check", "detect", "partial",
                                                                  "amplify"],
                                     "attack": ["lsp"], "defense": ["dvae"], "ratio": [0.5], "model": ["tinycnn"]},
           "train": {"preset": "smoke", "epochs": 1}, "defense_params": {"dvae": {"preset": "cpu", "epochs": 1}}}
    path = tmp_path / "kinds.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    counts = run_grid(str(path), out, workers=2, progress=False)
    s = Store.open_existing(out)
    try:
        recs = {r["kind"]: r for r in s.rows()}
    finally:
        s.close()
    assert counts["done"] == 5 and counts["failed"] == 0, {k: r["error"] for k, r in recs.items()}
    res = {k: r["results"] for k, r in recs.items()}
    assert 0 <= res["purify"]["final_acc"] <= 100 and res["purify"]["psnr"] > 5
    assert {"acc_clean_train", "acc_clean_test", "acc_poisoned_train"} <= set(res["disentangle-check"])
    # purifying cells measure every stage against the clean images they poisoned themselves
    for k in ("purify", "disentangle-check"):
        rep = res[k]["disentangle"]
        assert list(rep["all"]["stages"]) == ["input", "after stage 1", "after stage 2 subtraction", "output"]
        # the grid's ratio 0.5 poisons half: corr is defined on those 24, and they get their own block
        assert rep["all"]["p_hat"]["corr"]["n"] == 24 and rep["subset"]["n"] == 24
        assert res[k]["stage1_corr"] == rep["all"]["p_hat"]["corr"]["mean"]
        assert res[k]["stage1_energy_removed"] == rep["all"]["p_hat"]["energy_removed"]
        assert (out / "cells" / recs[k]["cell_id"] / "residual.png").exists()
    # partial poisoning (ratio 0.5): the poisoned half measured on its own
    assert res["partial"]["disentangle"]["subset"]["n"] == 24 and res["partial"]["disentangle"]["poisoned"]["partial"]
    assert res["detect"]["n_poisoned"] == 24 and 0 <= res["detect"]["recall"] <= 1  # ratio 0.5 of 48
    assert res["partial"]["detect_first"] is True and 0 <= res["partial"]["n_purified"] <= 48
    assert res["amplify"]["n_poisoned"] == 24 and "acc_small_poison_only" in res["amplify"]
    pids = {r["manifest"]["pid"] for r in recs.values()}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2  # ran in the workers, not in this process
    assert main(["report", str(out)]) == 0
    csvs = {p.name.split("-")[0] for p in (out / "report" / "tables").glob("*.csv")}
    assert {"table1", "table7", "table8", "amplify", "disentangle", "stage1", "stages"} <= csvs


def _npz_dataset(path: Path, seed: int) -> None:
    from unpoison.data import ImageDataset, make_synthetic, save_dataset

    ds = make_synthetic(n=48, size=8, channels=3, classes=4, seed=0)
    x = ds.x_train.copy()
    if seed:  # the same shape and labels, other images
        x = np.roll(x, seed, axis=2)
    save_dataset(ImageDataset(x, ds.y_train, ds.x_test, ds.y_test), path, overwrite=True)


def test_changed_content_at_same_path_recomputes_cells_and_poisons(tmp_path: Path) -> None:
    data = tmp_path / "d.npz"
    _npz_dataset(data, 0)
    cfg = tmp_path / "g.yaml"
    cfg.write_text(yaml.safe_dump({"axes": {"dataset": [str(data)], "attack": ["lsp"], "defense": ["none", "gray"],
                                            "model": ["tinycnn"]}, "train": {"preset": "smoke", "epochs": 1}}))
    out = tmp_path / "out"
    assert run_grid(str(cfg), out, progress=False)["done"] == 2
    first = {r["key"]: r for r in Store.open_existing(out).rows()}
    poisons = set((out / "cache" / "attacks").glob("*.npz"))
    assert len(poisons) == 1
    run_grid(str(cfg), out, progress=False)  # same content: nothing reruns
    again = {r["key"]: r for r in Store.open_existing(out).rows()}
    assert all(again[k]["attempts"] == 1 and again[k]["finished"] == first[k]["finished"] for k in first)
    _npz_dataset(data, 3)  # replaced at the same path
    assert run_grid(str(cfg), out, progress=False)["done"] == 2
    third = {r["key"]: r for r in Store.open_existing(out).rows()}
    assert all(third[k]["attempts"] == 2 and third[k]["data_digest"] != first[k]["data_digest"] for k in first)
    new = set((out / "cache" / "attacks").glob("*.npz")) - poisons
    assert len(new) == 1  # a new poison, keyed by the new content; the old one was not reused
    x_new = _load_x(data).astype(int)
    with np.load(next(iter(new))) as z, np.load(next(iter(poisons))) as old:
        # the new poison was made from the new images (a small perturbation of them); the old one was not
        assert np.abs(z["x"].astype(int) - x_new).mean() < 10 < np.abs(old["x"].astype(int) - x_new).mean()


def _load_x(path: Path) -> np.ndarray:
    from unpoison.data import load_dataset

    return load_dataset(path).x_train


def test_plugins_run_only_with_allow_plugins(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    marker = tmp_path / "ran"
    plug = tmp_path / "evil.py"
    plug.write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cfg = tmp_path / "g.yaml"
    cfg.write_text(yaml.safe_dump({"plugins": [str(plug)], "kind": "theorem2", "axes": {"seed": [0]}}))
    out = tmp_path / "out"
    assert main(["bench", str(cfg), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--allow-plugins" in err and "Python code" in err
    assert main(["bench", str(cfg), "--check"]) == 2
    assert not marker.exists() and not out.exists()
    with pytest.raises(UserError, match="allow-plugins"):
        run_grid(str(cfg), out, progress=False)
    assert main(["bench", str(cfg), str(out), "--quiet", "--allow-plugins"]) == 0 and marker.exists()


def test_check_lists_every_problem_and_a_run_refuses_to_start(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "g.yaml"
    cfg.write_text(yaml.safe_dump({
        "axes": {"dataset": [TINY], "model": ["tinycnn"],
                 "attack": ["none", {"name": "em", "params": {"roundz": 3}}, {"name": "em", "params":
                                                                             {"surrogate": "nonet"}, "label": "em2"}],
                 "defense": ["none", "avatar", {"name": "avatar", "params": {"checkpoint": str(tmp_path / "no.pt")},
                                                "label": "avatar-file"},
                             {"name": "dvae", "params": {"downsample1": 16}, "label": "dvae-big"}]},
        "train": {"preset": "smoke", "epoch": 4}, "params": {"no_such": 1}}))
    assert main(["bench", str(cfg), "--check"]) == 2
    err = capsys.readouterr().err
    for needle in ("unknown scoring setting(s) epoch", "kind 'purify' has no parameter(s) no_such", "roundz",
                   "unknown model 'nonet'", "avatar needs --checkpoint", "no.pt, which does not exist",
                   "too small for or not divisible"):
        assert needle in err, needle
    assert err.strip().splitlines()[-1].startswith("unpoison bench: error:")
    out = tmp_path / "out"
    assert main(["bench", str(cfg), str(out), "--quiet"]) == 2
    assert "more; 'unpoison bench CONFIG --check' lists them" in capsys.readouterr().err and not out.exists()
    # the kind decides what a defense may be: detection needs a purifier with a stage 1, not a training defense
    cfg.write_text(yaml.safe_dump({"kind": "amplify", "axes": {"dataset": [TINY], "attack": ["lsp"],
                                                               "defense": ["jpeg", "at"], "model": ["tinycnn"]}}))
    assert main(["bench", str(cfg), "--check"]) == 2
    err = capsys.readouterr().err
    assert "cannot infer p_hat on new images" in err and "needs a purifier, not the training-time defense" in err


def test_avatar_gets_its_diffusion_model_from_a_dependency_cell(tmp_path: Path) -> None:
    pytest.importorskip("diffusers")
    cfg = tmp_path / "g.yaml"
    cfg.write_text(yaml.safe_dump({"axes": {"dataset": ["synthetic:n=32,size=8,channels=1,classes=4,seed=0"],
                                            "attack": ["none"], "model": ["tinycnn"],
                                            "defense": [{"name": "avatar", "params": {"t_star": 3}}]},
                                   "diffusion": {"preset": "toy", "epochs": 1},
                                   "train": {"preset": "smoke", "epochs": 1}}))
    out = tmp_path / "out"
    assert run_grid(str(cfg), out, progress=False) == {"pending": 0, "running": 0, "done": 2, "failed": 0}
    rows_ = {r["kind"]: r for r in Store.open_existing(out).rows()}
    dep = rows_["train-diffusion"]
    assert Path(dep["results"]["checkpoint"]).is_file()
    assert rows_["purify"]["started"] >= dep["finished"]  # the dependency ran first
    assert rows_["purify"]["results"]["defense_info"]["t_star"] == 3
    assert main(["report", str(out)]) == 0
    assert "Dependencies" in (out / "report" / "report.md").read_text()


def test_report_escapes_user_names_and_builds_safe_file_names(tmp_path: Path) -> None:
    from unpoison.bench.paper import dvae_variant, paper_value
    from unpoison.bench.table import csv_safe

    cfg = {"name": "x", "axes": {"dataset": ["../../evil dir/x:y"], "attack": [{"name": "lsp", "label": "**b**|p"}],
                                 "defense": [{"name": "jpeg", "label": "=HYPERLINK(\"h\")"}], "model": ["tinycnn"]}}
    cells = expand(cfg)
    store = Store.create_or_open(tmp_path, fingerprint(cells), cells, cfg)
    store.record(cells[0].key, {"status": "done", "results": {"final_acc": 50.0, "psnr": 20.0}, "timings": {}})
    store.close()
    build_dir = tmp_path / "report"
    assert main(["report", str(tmp_path)]) == 0
    md = (build_dir / "report.md").read_text()
    assert "\\*\\*b\\*\\*\\|p" in md and "| **b**|p" not in md
    text = "".join(p.read_text() for p in (build_dir / "tables").glob("*.csv"))
    assert "'=HYPERLINK" in text and ",=HYPERLINK" not in text
    for f in [*(build_dir / "figures").iterdir(), *(build_dir / "tables").iterdir()]:
        assert f.parent in (build_dir / "figures", build_dir / "tables") and " " not in f.name and ".." not in f.name
    assert csv_safe("-0.69") == "-0.69" and csv_safe("@x") == "'@x" and csv_safe("+1+1") == "'+1+1"
    # Table 6's rows come from the D-VAE's real ablation parameters; Table 5 has no ISS column to fill
    base = {"dataset": "cifar10", "kind": "purify", "model": "resnet18", "attack": {"name": "lsp"}}
    assert paper_value({**base, "defense": {"name": "dvae", "params": {"skip_stage1": True}}}) == 66.76
    assert paper_value({**base, "defense": {"name": "dvae", "params": {"stage2_subtract": False}}}) == 90.63
    assert dvae_variant({"skip_stage1": True, "stage2_subtract": False}) is None
    assert paper_value({**base, "attack": {"name": "lsp", "eps": 2.0}, "defense": {"name": "avatar"}}) == 41.70


def test_ablation_report_shows_stage1_and_where_each_defense_wins(tmp_path: Path) -> None:
    """The ablation layout from a store with known numbers: the cells, the means, the best row, the note."""
    from unpoison.disentangle import headline, purification_report

    cfg = load_config("ablation", "smoke")
    cells = expand(cfg)
    acc = {"w/o": {"none": 90, "lsp": 20, "ops": 85, "em": 30, "tap": 75},  # ops drops 5: not effective
           "D-VAE": {"none": 89, "lsp": 88, "ops": 80, "em": 85, "tap": 86},
           "BDR-2": {"none": 89.5, "lsp": 89, "ops": 70, "em": 87, "tap": 80}}
    x_clean = np.full((4, 2, 2, 1), 100, np.uint8)
    x0 = x_clean.copy()
    x0[:, 0, 0, 0] = 110
    p_hat = np.zeros((4, 2, 2, 1), np.float32)
    p_hat[:, 0, 0, 0] = 5.0
    p_hat[:, 1, 1, 0] = 1.0
    rep = purification_report(x_clean, x0, x_clean, p_hat=p_hat)
    store = Store.create_or_open(tmp_path, fingerprint(cells), cells, cfg)
    for c in cells:
        d, a = c.config["defense"]["label"], c.config["attack"]["label"]
        res: dict = {"final_acc": acc.get(d, {}).get(a, 50.0), "psnr": 20.0}
        if d == "D-VAE" and a != "none":
            res.update(stage1_corr=0.8, stage1_energy_removed=0.6)
        if d == "D-VAE" and a == "lsp":
            res.update(disentangle=rep, **{k: v for k, v in headline(rep).items() if k.startswith("poison")})
        store.record(c.key, {"status": "done", "results": res, "timings": {"total": 1.0}})
    store.close()
    assert main(["report", str(tmp_path)]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| D-VAE | 89.00 | 88.00 \\[r 0.80, E 60%\\] | 80.00 \\[r 0.80, E 60%\\] |" in md
    assert "| 84.75 | 86.33 |" in md  # mean over the 4 poisons; over the effective ones (lsp, em, tap)
    assert "| BDR-2 | 89.50 | 89.00 | 70.00 | 87.00 | 80.00 | 81.50 | 85.33 |" in md
    assert "| best | BDR-2 | BDR-2 | D-VAE | BDR-2 | D-VAE |" in md
    assert "effective poisons (w/o defense, \\>= 10 points below the clean set): lsp, em, tap." in md
    assert "BDR-2 on none, lsp, em; D-VAE on ops, tap" in md
    assert "D-VAE 1.00" in md and "BDR-2 0.50" in md and "D-VAE: points below clean on the effective poisons: " \
        "lsp 2.00, em 5.00, tap 4.00." in md
    # the measured cell's stage-1 row: corr of (5, 0, 0, 1) with (10, 0, 0, 0) per image, energy 1 - 26/100
    corr = float(np.corrcoef([5, 0, 0, 1], [10, 0, 0, 0])[0, 1])
    (stage1,) = (tmp_path / "report" / "tables").glob("stage1-*.csv")
    line = next(ln for ln in stage1.read_text().splitlines() if ln.startswith("lsp,D-VAE,all,4,"))
    assert line.startswith(f"lsp,D-VAE,all,4,{corr:.3f},") and ",74.0%," in line
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Ablation: does stage 1 earn its cost?" in page and "88.00 [r 0.80, E 60%]" in page


def test_extend_grows_a_grid_keeping_finished_cells(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--extend adds a config's new cells to an OUTDIR holding an earlier version of the grid; finished cells
    are not rerun; a cell whose label now names another config, or another grid's name, is refused unchanged."""
    def write(defenses: list[Any], name: str = "grow") -> Path:
        cfg = tmp_path / f"{name}-{len(defenses)}.yaml"
        cfg.write_text(yaml.safe_dump({"name": name, "axes": {"dataset": [DATA], "attack": ["lsp"],
                                       "defense": defenses, "model": ["tinycnn"]},
                                       "train": {"preset": "smoke", "epochs": 1}}))
        return cfg

    out = tmp_path / "out"
    assert run_grid(str(write(["none"])), out, progress=False)["done"] == 1
    first = {r["key"]: r for r in Store.open_existing(out).rows()}
    bigger = write(["none", "gray"])
    with pytest.raises(UserError, match="--extend"):
        run_grid(str(bigger), out, progress=False)
    assert run_grid(str(bigger), out, progress=False, extend=True)["done"] == 2
    rows = {r["key"]: r for r in Store.open_existing(out).rows()}
    assert len(rows) == 2 and all(rows[k]["finished"] == first[k]["finished"] for k in first)
    # a smaller grid: the finished cell it no longer names stays; an unfinished one it no longer names goes
    store = Store.open_existing(out)
    store.conn.execute("UPDATE cells SET status='pending' WHERE key LIKE '%defense=gray%'")
    store.close()
    assert run_grid(str(write(["none", "jpeg"])), out, progress=False, extend=True)["done"] == 2
    left = {r["key"].split("defense=")[1].split("|")[0] for r in Store.open_existing(out).rows()}
    assert left == {"none", "jpeg"}
    assert run_grid(str(write(["jpeg"])), out, progress=False, extend=True)["done"] == 2  # "none" stays
    db = out / "results.sqlite"
    before = db.read_bytes()
    changed = write([{"name": "gray", "label": "none"}, "bdr"])  # label "none" now names another defense
    assert main(["bench", str(changed), str(out), "--extend", "--quiet"]) == 2
    assert "another config" in capsys.readouterr().err and db.read_bytes() == before
    assert main(["bench", str(write(["none", "gray", "bdr"], name="other")), str(out), "--extend", "--quiet"]) == 2
    assert "--extend: OUTDIR holds grid" in capsys.readouterr().err and db.read_bytes() == before


def test_frontier_report_gives_cpu_time_gaps_and_the_plot(tmp_path: Path) -> None:
    """The frontier layout from a store with known numbers: each defense's mean purification CPU time, its worst
    gap to the clean set over the effective poisons, its clean-set cost, and the accuracy-vs-CPU-time figure."""
    cfg = load_config("frontier", "smoke")
    cells = expand(cfg)
    acc = {"w/o": {"none": 90.0, "lsp": 30.0}, "BDR-2": {"none": 88.0, "lsp": 85.0},
           "D-VAE tiny": {"none": 89.0, "lsp": 87.5}}
    cpu = {"w/o": 0.0, "BDR-2": 3.0, "D-VAE tiny": 120.0}
    # a second seed for BDR-2 on lsp only: 84 and 86 -> 85.00 ± 1.00, seeds "1-2"
    extra = [Cell(key=c.key + "|seed=1", index=len(cells), config={**c.config, "seed": 1}) for c in cells
             if c.config["defense"]["label"] == "BDR-2" and c.config["attack"]["label"] == "lsp"]
    store = Store.create_or_open(tmp_path, fingerprint(cells + extra), cells + extra, cfg)
    for c in cells + extra:
        d, a = c.config["defense"]["label"], c.config["attack"]["label"]
        t = cpu[d] + (60.0 if a == "lsp" else 0.0)  # mean over the two attacks: cpu + 30 s
        v = acc[d][a] + (1.0 if c in extra else -1.0 if c.key in {e.key[:-7] for e in extra} else 0.0)
        store.record(c.key, {"status": "done", "results": {"final_acc": v},
                             "timings": {"total": 1.0, "purify": 2 * t, "purify_cpu": t}})
    store.close()
    assert main(["report", str(tmp_path)]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| D-VAE tiny | 2.50 | 1 | 87.50 | 89.00 | 2.50 | 1.00 |" in md  # (120 + 30) s; 90 - 87.5; 90 - 89
    assert "| BDR-2 | 0.72 | 1-2 | 85.00 ± 1.00 | 88.00 | 5.00 | 2.00 |" in md  # (63 + 63 + 3) / 3 s
    assert "| w/o | - | 1 | 30.00 | 90.00 | 60.00 | 0.00 |" in md
    assert list((tmp_path / "report" / "figures").glob("frontier-*.png"))


def test_attack_seed_shares_one_poison_across_cell_seeds(tmp_path: Path) -> None:
    """An attack entry's own ``seed`` fixes the poison for every training seed (one crafted file, read by both
    cells); without it each cell seed crafts its own. A non-integer or non-attack ``seed`` is refused."""
    def run(attack: Any, name: str) -> list[dict[str, Any]]:
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({"name": name, "axes": {"dataset": [DATA], "attack": [attack],
                                       "defense": ["none"], "model": ["tinycnn"], "seed": [0, 1]},
                                       "train": {"preset": "smoke", "epochs": 1}}))
        out = tmp_path / name
        assert run_grid(str(cfg), out, progress=False)["done"] == 2
        rows = sorted(Store.open_existing(out).rows(), key=lambda r: r["config"]["seed"])
        return [json.loads((out / "cells" / r["cell_id"] / "manifest.json").read_text())["cache"]["attack_cache"]
                for r in rows]

    fixed = run({"name": "lsp", "seed": 0}, "fixed")
    assert [c[0]["hit"] for c in fixed] == [False, True] and fixed[0][0]["path"] == fixed[1][0]["path"]
    own = run("lsp", "own")
    assert [c[0]["hit"] for c in own] == [False, False] and own[0][0]["path"] != own[1][0]["path"]
    assert Path(own[0][0]["path"]).name == Path(fixed[0][0]["path"]).name  # seed 0 is seed 0 either way
    for bad in ({"name": "lsp", "seed": "0"}, {"name": "lsp", "seed": -1}):
        with pytest.raises(UserError, match="'seed'"):
            expand({"axes": {"attack": [bad]}})
    with pytest.raises(UserError, match="'seed'"):
        expand({"axes": {"defense": [{"name": "jpeg", "seed": 0}]}})


def test_frontier_plot_front_presets_and_families() -> None:
    """The frontier figure's parts: the Pareto front (no point beats a front point on both axes; ties in CPU time
    keep the better one), which rows are a D-VAE preset (spelled out or named; a row one value off is none), and
    the points: the mean over seeds, the CPU time of the timed cells only, w/o as the per-attack baseline."""
    from unpoison.bench.figures import _frontier_points, dvae_preset_of, pareto_front
    from unpoison.defenses.dvae.config import DVAE_PRESETS

    pts = [{"x": x, "y": y, "label": lab} for x, y, lab in
           [(1.0, 80.0, "a"), (0.5, 70.0, "b"), (2.0, 75.0, "c"), (2.0, 85.0, "d"), (4.0, 85.0, "e"), (8.0, 90.0, "f")]]
    assert [p["label"] for p in pareto_front(pts)] == ["b", "a", "d", "f"]
    cpu = dict(DVAE_PRESETS.values("cpu", {}))
    assert dvae_preset_of({"name": "dvae", "params": cpu}) == "cpu"
    assert dvae_preset_of({"name": "dvae", "params": {"preset": "thorough"}}) == "thorough"
    assert dvae_preset_of({"name": "dvae", "params": {**cpu, "p_refit": "none"}}) is None  # the old cpu row
    assert dvae_preset_of({"name": "dvae", "params": {**cpu, "kld_limit2": 1.0}}) is None
    assert dvae_preset_of({"name": "bdr", "params": {}}) is None

    def row(defense: str, attack: str, acc: float, cpu_s: float | None, seed: int = 0, attempts: int = 1) -> dict:
        return {"status": "done", "attempts": attempts, "results": {"final_acc": acc},
                "timings": {} if cpu_s is None else {"purify_cpu": cpu_s},
                "config": {"seed": seed, "attack": {"name": attack, "label": attack},
                           "defense": {"name": defense, "label": defense, "params": {}}}}

    got, base = _frontier_points([row("none", "lsp", 30.0, None), row("bdr", "lsp", 84.0, 60.0),
                                  row("bdr", "lsp", 86.0, 120.0, seed=1), row("jpeg", "lsp", 50.0, 6.0),
                                  row("jpeg", "lsp", 52.0, 600.0, seed=1, attempts=2)])
    assert base == {"lsp": 30.0}
    bdr, jpeg = sorted(got["lsp"], key=lambda p: p["family"])
    assert (bdr["x"], bdr["y"], bdr["std"]) == (1.5, 85.0, 1.0)
    assert (jpeg["x"], jpeg["y"]) == (0.1, 51.0)  # the resumed cell's partial time left out, its accuracy kept


def test_report_number_formatter() -> None:
    """One formatter: a number in a format spec (scaled), a marker for no number; means with ± std over seeds."""
    from unpoison.bench.table import mean_text, num

    assert (num(3.14159), num(2, ".3g"), num(1234567, scale=1e-6), num(None), num("x", missing="-")) == \
        ("3.14", "2", "1.23", "", "-")
    assert num(float("nan")) == "nan" and num(True) == ""
    assert mean_text([1.0, 3.0]) == "2.00 ± 1.00" and mean_text([0.5], 3) == "0.500" and mean_text([]) == ""
    assert mean_text([0.25, None, float("nan")], pct=True, finite_only=True) == "25.0%"
    assert mean_text([None], finite_only=True) == "-"
    assert mean_text([float("inf"), float("inf")], finite_only=True) == "inf"


def test_paired_resolution_by_hand() -> None:
    """Two rows of seeds are resolved when the paired mean difference exceeds 2 standard errors (hand-computed)."""
    from unpoison.bench.table import mean_text, resolved

    assert mean_text([1.0, 3.0], count=True) == "2.00 ± 1.00 (2)" and mean_text([1.0], count=True) == "1.00"
    # differences 1, 1.2, 0.8: mean 1.0, sample std 0.2, se 0.2/sqrt(3) = 0.115 -> 1.0 > 0.23: resolved
    a, b = {0: 90.0, 1: 88.2, 2: 89.8}, {0: 89.0, 1: 87.0, 2: 89.0}
    assert resolved(a, b) is True
    # differences 1, -1.2, 0.8: mean 0.2, sample std 1.22, se 0.70 -> not resolved, although each row's mean differs
    assert resolved({0: 90.0, 1: 85.8, 2: 89.8}, b) is False
    assert resolved({0: 90.0}, {0: 80.0}) is None  # one shared seed: no spread to judge by
    assert resolved({0: 90.0, 1: 91.0}, {2: 80.0, 3: 81.0}) is None  # no shared seed


def test_pivot_marks_cells_not_resolved_from_the_rows_best() -> None:
    """The attack x defense pivot shows mean ± std (seeds) and marks what the seeds cannot tell from the best."""
    from unpoison.bench.table import pivot

    def cell(attack: str, defense: str, seed: int, acc: float) -> dict:
        return {"config": {"attack": attack, "defense": defense, "seed": seed}, "status": "done",
                "results": {"final_acc": acc}}

    cells = [cell("em", "dvae", s, v) for s, v in enumerate([88.0, 87.0, 88.5])]
    cells += [cell("em", "bdr", s, v) for s, v in enumerate([87.9, 86.8, 88.6])]  # paired diffs .1 .2 -.1
    cells += [cell("em", "none", s, v) for s, v in enumerate([20.0, 25.0, 22.0])]
    t = pivot(cells, "attack", "defense")
    row = dict(zip(t.header, t.rows[0]))
    assert row["dvae"] == "87.83 ± 0.62 (3)"  # the best: never marked
    assert row["bdr"].endswith(" ≈") and not row["none"].endswith("≈")
    assert "not resolved" in t.note
