"""``unpoison demo``: the product in one command (what ``make demo`` runs).

Fashion-MNIST (a stratified ``--n-train`` subset, the full test split) is poisoned with LSP, purified
with the two-stage D-VAE (``cpu`` preset), and the clean, poisoned and purified training sets are
each scored by the protocol's ``cpu`` preset (smallcnn, clean test accuracy at the last epoch).
Writes ``results.md``, ``results.json``, ``manifest.json`` and ``grid.png`` (clean / poisoned /
purified / amplified residual) into ``--out``, atomically. About 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..attacks import ATTACKS
from ..data import load_dataset, spec_path
from ..defenses.dvae import DVAE_PRESETS
from ..errors import UserError
from ..outputs import atomic_path, check_output, policy_for, write_marker
from ..pipeline import poison_dataset, purify_dataset
from ..scoring import evaluate
from ..train import SCORING_PRESETS, TrainConfig
from ..utils import Timer, manifest, psnr, to_json
from ..viz import residual_image, save_image_grid
from ._common import add_device_seed, add_overwrite, add_preset, add_quiet, announce_preset


def _tables() -> list:
    return [DVAE_PRESETS, SCORING_PRESETS]


def add_parser(sub: argparse._SubParsersAction, name: str, argv: list[str] | None = None) -> None:
    p = sub.add_parser(name, help="poison Fashion-MNIST with LSP, purify with D-VAE, score all three",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    add_overwrite(p)
    p.add_argument("--n-train", type=int, default=10000, help="training images (stratified subset; default 10000)")
    p.add_argument("--n-test", type=int, default=None, help="test images (default: the full test split)")
    p.add_argument("--data", default="fmnist", help="dataset spec (default fmnist)")
    p.add_argument("--attack", default="lsp", choices=ATTACKS.names(), help="poison (default lsp)")
    add_preset(p, _tables(), default="cpu")
    p.add_argument("--dvae-epochs", type=int, default=None, help="D-VAE epochs per stage (default: the preset's)")
    p.add_argument("--score-preset", default=None, choices=SCORING_PRESETS.choices(),
                   help="scoring protocol preset (default: --preset's)")
    p.add_argument("--score-epochs", type=int, default=None, help="classifier epochs (default: the preset's)")
    add_device_seed(p)
    add_quiet(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.n_train < 20:
        raise UserError(f"--n-train must be >= 20, got {args.n_train}")
    if args.n_test is not None and args.n_test < 1:
        raise UserError(f"--n-test must be >= 1, got {args.n_test}")
    preset = announce_preset(args, _tables())
    check_output(args.out, inputs=[spec_path(args.data)], overwrite=args.overwrite, is_dir=True)
    progress = not args.quiet
    timer = Timer()
    with timer("load"):
        full = load_dataset(args.data)
        if not full.has_test:
            raise UserError("the demo needs a dataset with a test split", full.source)
        ds = full.subset(args.n_train, args.n_test, seed=args.seed)
    say = print if progress else (lambda *a, **k: None)
    say(f"[1/4] {ds.source}: {len(ds.x_train)} training / {len(ds.x_test)} test images "
        f"{'x'.join(map(str, ds.image_shape))}; poisoning with {args.attack}")
    res = poison_dataset(ds, args.attack, seed=args.seed, device=args.device, progress=progress,
                         preset=ATTACKS.get(args.attack).presets().resolve(preset), timer=timer)
    x_clean, x_pois = ds.x_train, res.x
    say(f"[2/4] purifying with D-VAE ({preset} preset)")
    pur = purify_dataset(ds.replace(x_train=x_pois), "dvae", {"epochs": args.dvae_epochs}, preset=preset,
                         seed=args.seed, device=args.device, progress=progress, timer=timer)
    x_pur = pur.images
    print(f"purification: {timer.times['purify']:.1f} s for {len(x_pois)} images (D-VAE {preset} preset, "
          f"{pur.info.get('device', '?')}, {_threads()} torch threads)", flush=True)
    cfg = TrainConfig.preset(args.score_preset or preset, epochs=args.score_epochs)
    cfg.eval_every = 5  # last-epoch accuracy is the score; testing 10k images every epoch costs ~45 s in all
    rows: dict[str, dict[str, Any]] = {}
    for i, (name, x) in enumerate((("clean", x_clean), ("poisoned", x_pois), ("purified", x_pur))):
        say(f"[3/4] scoring the {name} training set ({cfg.model}, {cfg.epochs} epochs) [{i + 1}/3]")
        with timer(f"score_{name}"):
            rec = evaluate(ds.replace(x_train=x), ds, cfg, args.seed, args.device, progress=progress,
                           desc=f"score {name}")
        rows[name] = {"test_acc": rec["final_acc"], "best_acc": rec["best_acc"],
                      "psnr_vs_clean_db": psnr(x_clean, x), "score_time_s": rec["train_time_s"],
                      "per_class_acc": rec["per_class_acc"]}
    rows["poisoned"]["make_time_s"] = timer.times["poison"]
    rows["purified"]["make_time_s"] = timer.times["purify"]
    acc = {k: v["test_acc"] for k, v in rows.items()}
    drop, gap = acc["clean"] - acc["poisoned"], acc["clean"] - acc["purified"]
    verdict = {"poison_drop_points": drop, "purified_gap_points": gap, "poison_works": drop >= 30,
               "purification_works": gap <= 5}
    table = _table(rows)
    say("[4/4] results")
    print(table)
    print(f"poison drop: {verdict['poison_drop_points']:.1f} points; purified gap to clean: "
          f"{verdict['purified_gap_points']:.1f} points")
    config = {"data": args.data, "n_train": len(x_clean), "n_test": len(ds.x_test), "attack": args.attack,
              "attack_info": res.info, "dvae_preset": preset, "dvae_config": pur.info.get("config"),
              "score_config": vars(cfg)}
    results = {"rows": rows, "verdict": verdict, "dvae_info": pur.info, "timings_s": timer.times}
    _write(Path(args.out), table, verdict, config, results, args, timer, x_clean, x_pois, x_pur, pur.stages)
    print(f"wrote {args.out}/ (results.md, results.json, manifest.json, grid.png)")
    return 0


def _threads() -> int:
    return torch.get_num_threads()


def _table(rows: dict[str, dict[str, Any]]) -> str:
    lines = ["| training set | clean test acc (%) | PSNR vs clean (dB) | make time (s) | scoring time (s) |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        make = f"{r['make_time_s']:.1f}" if "make_time_s" in r else "-"
        ps = "inf" if not np.isfinite(r["psnr_vs_clean_db"]) else f"{r['psnr_vs_clean_db']:.2f}"
        lines.append(f"| {name} | {r['test_acc']:.2f} | {ps} | {make} | {r['score_time_s']:.1f} |")
    return "\n".join(lines)


def _write(out: Path, table: str, verdict: dict[str, Any], config: dict[str, Any], results: dict[str, Any],
           args: argparse.Namespace, timer: Timer, x_clean: np.ndarray, x_pois: np.ndarray, x_pur: np.ndarray,
           stages: dict[str, np.ndarray]) -> None:
    with atomic_path(out, is_dir=True, policy=policy_for(args.overwrite)) as tmp:
        tmp.mkdir()
        write_marker(tmp, "demo")
        grid_rows = {"clean": x_clean, "poisoned": x_pois, **stages, "purified": x_pur,
                     "residual (poisoned - purified, amplified)": residual_image(x_pois, x_pur)}
        save_image_grid(grid_rows, tmp / "grid.png",
                        title=f"{config['attack'].upper()}-poisoned {config['data']} purified by D-VAE")
        md = [f"# unpoison demo: {config['attack']} on {config['data']} ({config['n_train']} training images)",
              "", table, "",
              f"Poison drop: {verdict['poison_drop_points']:.1f} points (target >= 30); purified gap to clean: "
              f"{verdict['purified_gap_points']:.1f} points (target <= 5).", "",
              f"D-VAE preset `{config['dvae_preset']}`; scoring: `{config['score_config']['model']}`, "
              f"{config['score_config']['epochs']} epochs, accuracy at the last epoch. Seed {args.seed}.", "",
              "![grid](grid.png)", ""]
        (tmp / "results.md").write_text("\n".join(md))
        (tmp / "results.json").write_text(to_json(results) + "\n")
        argv = {k: v for k, v in vars(args).items() if k != "func"}
        (tmp / "manifest.json").write_text(to_json(manifest("demo", {**config, "args": argv}, args.seed,
                                                            timer.times, verdict=verdict)) + "\n")
