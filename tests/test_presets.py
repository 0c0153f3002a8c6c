"""One preset mechanism for every family, CLI choices from the registries, per-method help, estimator hygiene."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from unpoison.cli import main
from unpoison.errors import UserError
from unpoison.presets import PRESET_TABLES, PresetTable, choose


def test_every_family_registers_its_table_and_rejects_unknown_keys() -> None:
    import unpoison.bench.grid  # noqa: F401  (registers the bench table)
    import unpoison.defenses.avatar  # noqa: F401
    from unpoison.attacks.base import make_attack
    from unpoison.defenses.dvae import DVAEConfig
    from unpoison.train import TrainConfig

    fams = set(PRESET_TABLES.names())
    assert {"scoring", "dvae", "diffusion", "bench", "attack em", "attack lsp"} <= fams
    with pytest.raises(UserError, match="unknown scoring setting.*epoch"):
        TrainConfig.preset("cpu", epoch=4)  # a typo is an error, never silently ignored
    with pytest.raises(UserError, match="unknown D-VAE setting"):
        DVAEConfig.preset("cpu", widht=4)
    with pytest.raises(UserError, match="unknown scoring preset 'huge'"):
        TrainConfig.preset("huge")
    with pytest.raises(UserError, match="has no parameter.*roundz|takes no parameter.*roundz"):
        make_attack("em", roundz=3)
    # a preset sets only keys its family knows: a misspelled one is caught when the table is registered
    with pytest.raises(RuntimeError, match="unknown key"):
        PresetTable("t", {"cpu": {"epohcs": 1}}, keys={"epochs"})
    # aliases: a family without its own smoke preset sizes smoke runs with cpu
    assert DVAEConfig.preset("smoke") == DVAEConfig.preset("cpu")
    assert make_attack("em", preset="smoke").preset == "cpu"


def test_auto_is_paper_on_cuda_cpu_otherwise_and_says_so() -> None:
    name, line = choose("auto", "cpu")
    assert name == "cpu" and "auto" in line and "no CUDA" in line
    assert choose("paper", "cpu") == ("paper", None)
    from unpoison.train import TrainConfig

    want = "resnet18" if torch.cuda.is_available() else "smallcnn"
    assert TrainConfig.preset("auto").model == want


def test_cli_preset_choices_come_from_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    from unpoison.defenses.dvae import DVAE_PRESETS

    with pytest.raises(SystemExit):
        main(["purify", "--help"])
    out = capsys.readouterr().out
    assert "{" + ",".join(DVAE_PRESETS.choices()) + "}" in out
    assert "auto (default): paper on CUDA, cpu on CPU" in out


def test_method_help_shows_that_methods_parameters_with_real_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["purify", "x", "y", "--method", "jpeg", "--help"])
    out = capsys.readouterr().out
    assert "--quality QUALITY" in out and "(default: 10)" in out and "--width" not in out
    with pytest.raises(SystemExit):
        main(["purify", "--method", "dvae", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--width WIDTH" in out and "paper 64, imagenet 64, cpu 8, thorough 8" in out and "(dvae: None" not in out
    with pytest.raises(SystemExit):
        main(["poison", "--attack", "em", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--rounds ROUNDS" in out and "paper 100, cpu 40" in out and "--cluster-std" not in out
    with pytest.raises(SystemExit):
        main(["evaluate", "--train-defense", "ueraser", "--help"])
    out = capsys.readouterr().out
    assert "--switch-frac" in out and "--repeats" in out


def test_method_flags_follow_the_method(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from unpoison.data import make_synthetic, save_dataset

    data = save_dataset(make_synthetic(n=32, size=8, channels=1, classes=4, seed=0), tmp_path / "d.npz")
    out = tmp_path / "o.npz"
    assert main(["purify", str(data), str(out), "--method", "jpeg", "--width", "8", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unrecognized arguments: --width" in err and not out.exists()
    assert main(["purify", str(data), str(out), "--method", "jpeg", "--quality", "30", "--quiet"]) == 0
    man = json.loads((tmp_path / "o.npz.report" / "manifest.json").read_text())
    assert man["config"]["params"] == {"quality": 30}
    # training-time defenses take parameters now
    assert main(["evaluate", str(data), "--preset", "smoke", "--epochs", "1", "--train-defense", "at", "--steps", "2",
                 "--eps", "4/255", "--quiet", "--out", str(tmp_path / "e.json")]) == 0
    rec = json.loads((tmp_path / "e.json").read_text())["result"]
    assert rec["train_defense"] == {"name": "at", "params": {"steps": 2, "eps": "4/255"}}


def test_one_preset_sizes_detections_stage1_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from unpoison.data import make_synthetic, save_dataset

    data = save_dataset(make_synthetic(n=32, size=8, channels=3, classes=4, seed=0), tmp_path / "d.npz")
    out = tmp_path / "s.csv"
    assert main(["detect", str(data), str(out), "--method", "dvae", "--epochs", "1", "--param", "epochs=1",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    man = json.loads(Path(str(out) + ".json").read_text())
    if not torch.cuda.is_available():
        assert "preset cpu (auto: no CUDA device" in printed
        assert man["config"]["preset"] == "cpu"
        assert man["config"]["train"]["model"] == "smallcnn"
        assert man["result"]["purifier_info"]["params"]["preset"] == "cpu"  # the D-VAE, not only the classifier
        assert man["result"]["purifier_info"]["params"]["epochs"] == 1


def test_library_calls_leave_the_global_rng_alone() -> None:
    from unpoison.attacks import make_attack
    from unpoison.data import make_synthetic
    from unpoison.defenses import make_purifier
    from unpoison.train import TrainConfig, train_classifier

    ds = make_synthetic(n=32, size=8, channels=3, classes=4, seed=0)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    atk = make_attack("em", seed=3, device="cpu", progress=False, preset="cpu", surrogate="tinycnn", rounds=1)
    a = atk.poison(ds.x_train, ds.y_train)
    make_purifier("dvae", preset="cpu", epochs=1, device="cpu", progress=False).fit_purify(ds.x_train, ds.y_train)
    r1 = train_classifier(ds, config=TrainConfig.preset("smoke", epochs=1), seed=5, device="cpu", progress=False)
    assert torch.equal(torch.get_rng_state(), before)  # nothing reseeded the caller's generator
    # ... and results do not depend on the caller's RNG state
    torch.manual_seed(999)
    b = make_attack("em", seed=3, device="cpu", progress=False, preset="cpu", surrogate="tinycnn",
                    rounds=1).poison(ds.x_train, ds.y_train)
    r2 = train_classifier(ds, config=TrainConfig.preset("smoke", epochs=1), seed=5, device="cpu", progress=False)
    assert np.array_equal(a.x, b.x) and r1.history == r2.history
    # poison() sets run state (eps_, device_) and leaves the parameters as they were
    assert atk.device == "cpu" and atk.eps_nominal == pytest.approx(8 / 255) and not hasattr(atk, "eps")


def test_no_io_or_device_choice_in_init(tmp_path: Path) -> None:
    from unpoison.data import make_synthetic
    from unpoison.defenses import make_purifier

    pur = make_purifier("avatar", checkpoint=str(tmp_path / "missing.pt"))  # no file check at construction
    assert pur.required_files() == [str(tmp_path / "missing.pt")]
    ds = make_synthetic(n=16, size=8, channels=1, classes=2, seed=0)
    with pytest.raises(UserError, match="not found"):
        pur.fit_purify(ds.x_train)
    if not torch.cuda.is_available():
        dv = make_purifier("dvae", preset="cpu", device="cuda")  # configured, not chosen, at construction
        with pytest.raises(UserError, match="no CUDA device"):
            dv.fit(ds.x_train, ds.y_train)


def test_ueraser_switch_frac_follows_the_run_length() -> None:
    from unpoison.defenses import make_train_defense

    ue = make_train_defense("ueraser", switch_frac=0.8)
    ue.begin(50)
    assert ue.switch_step == 40 and ue.current_repeats() == 5
    with pytest.raises(UserError, match="no parameter"):
        make_train_defense("ueraser", nope=1)
    with pytest.raises(UserError, match="switch_frac"):
        make_train_defense("ueraser", switch_frac=0.5, switch_step=3)


def test_attack_resume_refuses_other_images_with_the_same_shape_and_labels(tmp_path: Path) -> None:
    from unpoison.attacks import make_attack
    from unpoison.data import make_synthetic

    ds = make_synthetic(n=32, size=8, channels=3, classes=4, seed=0)
    kw = {"seed": 0, "device": "cpu", "progress": False, "preset": "cpu", "surrogate": "tinycnn", "rounds": 1,
          "checkpoint_dir": str(tmp_path)}
    make_attack("em", **kw).poison(ds.x_train, ds.y_train)
    other = np.roll(ds.x_train, 1, axis=1)  # same shape, same labels, other content
    with pytest.raises(UserError, match="different run"):
        make_attack("em", resume=True, **kw).poison(other, ds.y_train)
    make_attack("em", resume=True, **kw).poison(ds.x_train, ds.y_train)  # the same images resume
