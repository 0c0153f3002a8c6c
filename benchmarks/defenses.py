"""Baseline defenses vs D-VAE on Fashion-MNIST (a CPU-sized version of the paper's Table 2).

Rows: clean data and each availability poison that exists (default LSP, AR, OPS, EM); columns: no
defense, JPEG-10, BDR-2, PGD adversarial training, UEraser and D-VAE (``cpu`` preset). Each cell is
the clean test accuracy at the last epoch of ``evaluate`` with ``TrainConfig.preset("cpu")``
(smallcnn). Poisoned training sets are cached as npz in ``--cache-dir`` and reused; finished cells
are kept in ``--out``'s JSON twin so a killed run resumes where it stopped. Writes
``docs/results/defenses.md`` (+ ``defenses.json`` with every record and a manifest).

    .venv/bin/python benchmarks/defenses.py                      # the full run (hours on 2 CPU cores)
    .venv/bin/python benchmarks/defenses.py --n-train 256 --n-test 128 --epochs 1 --attacks lsp \\
        --defenses none,jpeg10,at --out /tmp/d.md                  # a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from unpoison.attacks import ATTACKS
from unpoison.attacks.base import Attack
from unpoison.data import ImageDataset, load_dataset
from unpoison.defenses import DEFENSES, make_purifier, make_train_defense
from unpoison.evaluate import evaluate
from unpoison.train import TrainConfig
from unpoison.utils import atomic_path, manifest, psnr, seed_everything, to_json, write_json, write_text_atomic

#: defense column -> (kind, registry name, params)
DEFENSE_SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "none": ("none", "", {}),
    "jpeg10": ("purifier", "jpeg", {"quality": 10}),
    "bdr2": ("purifier", "bdr", {"bits": 2}),
    "at": ("train", "at", {}),
    "ueraser": ("train", "ueraser", {}),
    "dvae": ("purifier", "dvae", {"preset": "cpu"}),
}
TITLES = {"none": "none", "jpeg10": "JPEG-10", "bdr2": "BDR-2", "at": "AT", "ueraser": "UEraser", "dvae": "D-VAE"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="fmnist")
    p.add_argument("--n-train", type=int, default=5000, help="stratified training subset (default 5000)")
    p.add_argument("--n-test", type=int, default=1000, help="stratified test subset (default 1000)")
    p.add_argument("--attacks", default="lsp,ar,ops,em", help="comma list; 'clean' is always included")
    p.add_argument("--defenses", default=",".join(DEFENSE_SPECS), help=f"comma list of {', '.join(DEFENSE_SPECS)}")
    p.add_argument("--epochs", type=int, default=None, help="classifier epochs (default: the cpu preset's 15)")
    p.add_argument("--at-epochs", type=int, default=5,
                   help="epochs for adversarial training, cut short on CPU (11 forward/backward passes a step)")
    p.add_argument("--ueraser-epochs", type=int, default=8,
                   help="epochs for UEraser, cut short on CPU (K=5 forward passes a step; default 8)")
    p.add_argument("--ueraser-switch", type=float, default=0.8,
                   help="UEraser uses K=5 copies for this fraction of the steps, then K=1 (default 0.8)")
    p.add_argument("--cache-dir", default=".cache/unpoison/poisons", help="poisoned npz cache (reused)")
    p.add_argument("--out", default="docs/results/defenses.md")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def available_attacks(wanted: list[str]) -> tuple[list[str], list[str]]:
    have = [a for a in wanted if a in ATTACKS]
    return have, [a for a in wanted if a not in ATTACKS]


def attack_code(attack: str) -> str:
    """A short hash of an attack's default parameters and source (its module and the shared base), so a
    changed attack never reuses a stale cached poison or a finished cell."""
    cls = ATTACKS.get(attack)
    src = Path(inspect.getfile(cls)).read_bytes() + Path(inspect.getfile(Attack)).read_bytes()
    return hashlib.sha1(src + json.dumps(cls().get_params(), sort_keys=True, default=str).encode()).hexdigest()[:10]


def poisoned_train(ds: ImageDataset, attack: str, args: argparse.Namespace) -> tuple[np.ndarray, dict[str, Any]]:
    """The poisoned training images for ``attack``, from the cache when an identical run made them."""
    from unpoison.attacks import make_attack

    key = f"{Path(str(args.data)).name}_{attack}_n{len(ds.x_train)}_seed{args.seed}_{attack_code(attack)}.npz"
    path = Path(args.cache_dir) / key
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            if z["x"].shape == ds.x_train.shape and np.array_equal(z["y"], ds.y_train):
                return z["x"], {**json.loads(str(z["info"])), "cached": str(path)}
    t0 = time.perf_counter()
    res = make_attack(attack, seed=args.seed, device=args.device, progress=not args.quiet).poison(
        ds.x_train, ds.y_train)
    info = {**res.info, "poison_time_s": time.perf_counter() - t0}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, x=res.x, y=ds.y_train, info=np.array(to_json(info)))
    return res.x, info


def run_cell(train: ImageDataset, test: ImageDataset, defense: str, args: argparse.Namespace,
             cfg: TrainConfig) -> dict[str, Any]:
    kind, name, params = DEFENSE_SPECS[defense]
    rec: dict[str, Any] = {"defense": defense}
    train_defense = None
    cfg = TrainConfig(**vars(cfg))
    t0 = time.perf_counter()
    if kind == "purifier":
        cls = DEFENSES.get(name)
        common = {"device": args.device, "seed": args.seed, "progress": not args.quiet}
        pur = make_purifier(name, **params, **{k: v for k, v in common.items() if k in cls.COMMON})
        x = pur.fit_purify(train.x_train, train.y_train)
        rec["psnr_vs_input"] = psnr(train.x_train, x)
        rec["purify_time_s"] = time.perf_counter() - t0
        train = train.replace(x_train=x)
    elif kind == "train":
        if defense == "at":
            cfg.epochs = args.at_epochs
        if defense == "ueraser" and args.ueraser_epochs:
            cfg.epochs = args.ueraser_epochs
        if defense == "ueraser":
            steps = cfg.epochs * ((len(train.x_train) + cfg.batch_size - 1) // cfg.batch_size)
            params = {"switch_step": int(args.ueraser_switch * steps)}
            rec["ueraser_switch_step"] = params["switch_step"]
        train_defense = make_train_defense(name, **params)
    rec["epochs"] = cfg.epochs
    res = evaluate(train, test, cfg, args.seed, args.device, train_defense, progress=not args.quiet,
                   desc=f"{defense}")
    rec.update({k: res[k] for k in ("final_acc", "best_acc", "best_epoch", "train_time_s")})
    rec["total_time_s"] = time.perf_counter() - t0
    return rec


def render(results: dict[str, dict[str, Any]], rows: list[str], cols: list[str], args: argparse.Namespace,
           notes: list[str], full_epochs: int) -> str:
    lines = [
        "# Baseline defenses vs D-VAE on Fashion-MNIST (CPU)",
        "",
        f"Clean test accuracy (%) at the last epoch; smallcnn, `TrainConfig.preset(\"cpu\")` ({full_epochs} "
        f"epochs unless noted); data: {args.data}, stratified subset of {args.n_train} training / {args.n_test} "
        f"test images; seed {args.seed}. Poisons from `unpoison.attacks.make_attack` at the paper's default "
        "bounds (l2 bounds scaled by sqrt(d/3072)). Produced by `benchmarks/defenses.py`.",
        "",
        "| training data | " + " | ".join(TITLES[c] for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for r in rows:
        cells = []
        for c in cols:
            rec = results.get(f"{r}/{c}")
            cells.append("-" if rec is None else (f"{rec['final_acc']:.2f}" if "final_acc" in rec else "failed"))
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    lines += ["", "PSNR (dB) of each purifier's output against its input (training split):", ""]
    pur_cols = [c for c in cols if DEFENSE_SPECS[c][0] == "purifier"]
    if pur_cols:
        lines += ["| training data | " + " | ".join(TITLES[c] for c in pur_cols) + " |",
                  "|---|" + "---|" * len(pur_cols)]
        for r in rows:
            vals = [results.get(f"{r}/{c}", {}).get("psnr_vs_input") for c in pur_cols]
            lines.append(f"| {r} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + " |")
    lines += ["", "Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed_everything(args.seed)
    cols = [c.strip() for c in args.defenses.split(",") if c.strip()]
    bad = [c for c in cols if c not in DEFENSE_SPECS]
    if bad:
        print(f"unknown defenses {bad}; known: {', '.join(DEFENSE_SPECS)}", file=sys.stderr)
        return 2
    notes: list[str] = []
    missing_purifiers = [c for c in cols if DEFENSE_SPECS[c][0] == "purifier" and DEFENSE_SPECS[c][1] not in DEFENSES]
    if missing_purifiers:
        notes.append(f"not run (purifier not registered yet): {', '.join(missing_purifiers)}")
        cols = [c for c in cols if c not in missing_purifiers]
    wanted = [a.strip() for a in args.attacks.split(",") if a.strip() and a.strip() != "clean"]
    attacks, absent = available_attacks(wanted)
    if absent:
        notes.append(f"not run (attack not available): {', '.join(absent)}")
    cfg = TrainConfig.preset("cpu", epochs=args.epochs)
    full = load_dataset(args.data)
    ds = full.subset(args.n_train, args.n_test, seed=args.seed)
    out_md = Path(args.out)
    out_json = out_md.with_suffix(".json")
    results: dict[str, dict[str, Any]] = {}
    if out_json.is_file():  # resume: keep cells that a run with the same settings finished
        old = json.loads(out_json.read_text())
        if old.get("settings") == settings(args):
            results = old.get("results", {})
    if "at" in cols:
        notes.append(f"AT cut short on CPU: {args.at_epochs} epochs instead of {cfg.epochs} (PGD eps 8/255, "
                     "10 steps of 1.6/255, random start; crafted in eval mode)")
    if "ueraser" in cols:
        notes.append(f"UEraser cut short on CPU: {args.ueraser_epochs or cfg.epochs} epochs instead of {cfg.epochs}; "
                     f"K=5 loss-maximising kornia augmentations for the first {args.ueraser_switch:.0%} of the "
                     "steps, then K=1")
    if "dvae" in cols:
        notes.append("D-VAE: `make_purifier(\"dvae\", preset=\"cpu\")` (two stages), fit on the poisoned "
                     "training split itself")
    rows = ["clean", *attacks]
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    for r in rows:
        if r == "clean":
            train = ds
        else:
            t0 = time.perf_counter()
            x_p, info = poisoned_train(ds, r, args)
            timings[f"poison/{r}"] = time.perf_counter() - t0
            train = ds.replace(x_train=x_p)
            results.setdefault(f"{r}/_poison", {"info": info, "psnr_vs_clean": psnr(ds.x_train, x_p)})
        for c in cols:
            key = f"{r}/{c}"
            if key in results and "final_acc" in results[key]:
                continue
            print(f"== {key}", flush=True)
            try:
                results[key] = run_cell(train, ds, c, args, cfg)
            except Exception as e:  # noqa: BLE001 - one failing cell must not lose the others
                results[key] = {"defense": c, "error": f"{type(e).__name__}: {e}"}
                notes.append(f"{key} failed: {type(e).__name__}: {e}")
            print(f"   {key}: {results[key].get('final_acc', 'failed')}", flush=True)
            write_json(out_json, {"settings": settings(args), "results": results})
    timings["total"] = time.perf_counter() - t_all
    write_text_atomic(out_md, render(results, rows, cols, args, notes, cfg.epochs))
    write_json(out_json, {"settings": settings(args), "results": results,
                          "manifest": manifest("benchmarks/defenses.py", settings(args), args.seed, timings)})
    print(f"wrote {out_md} and {out_json}")
    return 0


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What a finished cell depends on; a resumed run keeps cells only when all of it matches."""
    out = {k: v for k, v in vars(args).items() if k not in ("quiet", "out", "cache_dir", "device")}
    wanted = [a.strip() for a in str(args.attacks).split(",") if a.strip() and a.strip() in ATTACKS]
    return {**out, "attack_code": {a: attack_code(a) for a in wanted}}


if __name__ == "__main__":
    sys.exit(main())
