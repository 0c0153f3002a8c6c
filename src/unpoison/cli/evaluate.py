"""``unpoison evaluate TRAIN``: train a classifier on TRAIN, report clean test accuracy (last epoch)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import load_dataset, spec_path
from ..models import list_models
from ..outputs import check_output, policy_for
from ..train import TrainConfig
from ..utils import Timer, manifest, write_json
from ._common import add_device_seed, add_memory_budget, add_overwrite, add_quiet


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="score a training set by clean test accuracy", description=__doc__)
    p.add_argument("train", help="training data (dataset spec)")
    p.add_argument("--test", default=None, help="test data (default: TRAIN's own test split)")
    p.add_argument("--preset", default="paper", choices=["paper", "cpu", "smoke"],
                   help="protocol preset: paper = ResNet-18 60 epochs; cpu = smallcnn 15 epochs")
    p.add_argument("--model", default=None, choices=list_models(), help="classifier (overrides the preset)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--no-flip", action="store_true", help="no horizontal flip (digit-like data)")
    p.add_argument("--train-defense", default=None,
                   help="training-time defense: at (PGD adversarial training) or ueraser")
    p.add_argument("--out", default=None, help="write the JSON record here (default: print only)")
    add_overwrite(p)
    add_memory_budget(p)
    add_device_seed(p)
    add_quiet(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluate import evaluate

    timer = Timer()
    inputs = [spec_path(args.train), spec_path(args.test) if args.test else None]
    if args.out:
        check_output(args.out, inputs=inputs, overwrite=args.overwrite, is_dir=False, dataset=False)
    with timer("load"):
        train = load_dataset(args.train, mmap=True)  # an npy folder larger than the budget streams from disk
        test = load_dataset(args.test, mmap=True) if args.test else None
    if args.out:
        check_output(args.out, inputs=[*inputs, train.source, test.source if test else None],
                     overwrite=args.overwrite, is_dir=False, dataset=False)
    cfg = TrainConfig.preset(args.preset, model=args.model, epochs=args.epochs, batch_size=args.batch_size,
                             lr=args.lr)
    if args.no_flip:
        cfg.flip = False
    defense = None
    if args.train_defense:
        from ..defenses import make_train_defense

        defense = make_train_defense(args.train_defense)
    with timer("train"):
        rec = evaluate(train, test, cfg, args.seed, args.device, defense, progress=not args.quiet,
                       memory_budget=args.memory_budget)
    rec["train_defense"] = args.train_defense
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
