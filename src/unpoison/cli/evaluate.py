"""``unpoison evaluate TRAIN``: train a classifier on TRAIN, report clean test accuracy (last epoch).

``--preset`` (default auto: paper on CUDA, cpu on CPU) picks the protocol; ``--train-defense NAME`` trains
with a training-time defense, whose parameters are flags (``--train-defense at --help`` lists them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import check_file_output, load_dataset
from ..defenses import TRAIN_DEFENSES, make_train_defense
from ..errors import UserError
from ..models import list_models
from ..outputs import policy_for
from ..scoring import evaluate
from ..train import SCORING_PRESETS, TrainConfig
from ..utils import Timer, manifest, write_json
from ._common import (
    add_device_seed,
    add_memory_budget,
    add_method_flags,
    add_overwrite,
    add_preset,
    add_quiet,
    announce_preset,
    given_params,
    peek,
)


def add_parser(sub: argparse._SubParsersAction, name: str, argv: list[str] | None = None) -> None:
    p = sub.add_parser(name, help="score a training set by clean test accuracy", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("train", help="training data (dataset spec)")
    p.add_argument("--test", default=None, help="test data (default: TRAIN's own test split)")
    add_preset(p, [SCORING_PRESETS])
    p.add_argument("--model", default=None, choices=list_models(), help="classifier (overrides the preset)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--no-flip", action="store_true", help="no horizontal flip (digit-like data)")
    p.add_argument("--train-defense", default=None,
                   help="; ".join(f"{n}: {TRAIN_DEFENSES.help(n)}" for n in TRAIN_DEFENSES.names()))
    p.add_argument("--out", default=None, help="write the JSON record here (default: print only)")
    add_overwrite(p)
    add_memory_budget(p)
    add_device_seed(p)
    add_quiet(p)
    td = peek(argv, "--train-defense")
    if td in TRAIN_DEFENSES:
        params = TRAIN_DEFENSES.get(td).PARAMS
        defaults = {k: str(v.default) for k, v in params.items()}
        add_method_flags(p, params, defaults, {"seed"}, f"parameters of --train-defense {td}")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    timer = Timer()
    specs = [args.train, args.test]
    if args.out:
        check_file_output(args.out, specs, args.overwrite)
    with timer("load"):
        train = load_dataset(args.train, mmap=True)  # an npy folder larger than the budget streams from disk
        test = load_dataset(args.test, mmap=True) if args.test else None
    if args.out:
        check_file_output(args.out, specs, args.overwrite, [train.source, test.source if test else None])
    cfg = TrainConfig.preset(announce_preset(args, [SCORING_PRESETS]), model=args.model, epochs=args.epochs,
                             batch_size=args.batch_size, lr=args.lr)
    if args.no_flip:
        cfg.flip = False
    defense = None
    params = given_params(args)
    if args.train_defense:
        defense = make_train_defense(args.train_defense, **params)
    elif params:
        raise UserError(f"{', '.join('--' + k.replace('_', '-') for k in params)} need --train-defense")
    with timer("train"):
        rec = evaluate(train, test, cfg, args.seed, args.device, defense, progress=not args.quiet,
                       memory_budget=args.memory_budget)
    rec["train_defense"] = {"name": args.train_defense, "params": params} if args.train_defense else None
    print(f"clean test accuracy (last epoch): {rec['final_acc']:.2f}%   best: {rec['best_acc']:.2f}% "
          f"(epoch {rec['best_epoch']})   time: {rec['train_time_s']:.1f}s   {rec['images_per_s']:.0f} img/s")
    print("per class: " + ", ".join(f"{k}={v:.1f}" for k, v in rec["per_class_acc"].items()))
    if args.out:
        write_json(Path(args.out), manifest("evaluate", vars_clean(args), args.seed, timer.times, result=rec),
                   policy_for(args.overwrite, dataset=False))
        print(f"wrote {args.out}")
    return 0


def vars_clean(args: argparse.Namespace) -> dict[str, object]:
    return {k: v for k, v in vars(args).items() if k != "func"}
