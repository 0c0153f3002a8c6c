"""``unpoison poison IN OUT --attack NAME``: availability-poison a training split, write it and a report.

The training split is poisoned (all of it, or an exact random fraction ``--ratio``: round(ratio*N)
images); the test split is copied unchanged. OUT keeps IN's format unless ``--format`` says otherwise
and is written atomically. ``OUT.report/`` holds ``perturbation.npy`` (int16, poisoned - clean, in
grey levels), ``manifest.json`` (attack, bound, parameters, seed, surrogate accuracy, poisoned
indices, timings) and ``grid.png``.

Bounds: ``--eps`` in [0, 1] pixel units (``8/255``) for linf, per-image l2 quoted at CIFAR size
(scaled by sqrt(d/3072) unless ``--no-scale-eps``), whole pixels for l0. Every bound is checked on
the stored uint8 images; a run that breaks it writes nothing.

Method parameters are flags generated from the chosen attack's ``PARAMS``: ``unpoison poison --attack
NAME --help`` lists them with their defaults per preset. ``--preset`` (default auto: paper on CUDA, cpu
on CPU) sizes the attack (surrogate, rounds, steps).

``--from-perturbation FILE`` adds a released perturbation instead of crafting one: ``.npy``
(loaded with allow_pickle=False) or ``.pt`` (a tensor, torch.load(weights_only=True)); shape
N x H x W x C or N x C x H x W (or one pattern for all); float values are in [-1, 1] pixel units,
integer values in grey levels. ``--norm``/``--eps`` (or ``--attack``'s defaults) give the bound.
"""

from __future__ import annotations

import argparse
import math

from ..attacks import ATTACKS
from ..attacks.base import NORMS
from ..data import check_dataset_output, load_dataset
from ..errors import UserError
from ..outputs import report_dir
from ..pipeline import poison_dataset, write_poison_outputs
from ..utils import Timer, parse_fraction
from ._common import (
    add_device_seed,
    add_format,
    add_method_flags,
    add_overwrite,
    add_preset,
    add_quiet,
    announce_preset,
    given_params,
    peek,
)


def add_parser(sub: argparse._SubParsersAction, name: str, argv: list[str] | None = None) -> None:
    attack = peek(argv, "--attack")
    p = sub.add_parser(name, help="poison a training set with an availability attack", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="clean dataset spec")
    p.add_argument("output", help="where to write the poisoned dataset")
    p.add_argument("--attack", default=None,
                   help="; ".join(f"{n}: {ATTACKS.help(n)}" for n in ATTACKS.names()).replace("%", "%%"))
    p.add_argument("--eps", default=None, help="bound (default: the paper's for the attack): 8/255, 1.0, 1")
    p.add_argument("--norm", default=None, choices=NORMS, help="norm (default: the attack's)")
    p.add_argument("--no-scale-eps", action="store_true", help="take an l2 bound literally (no sqrt(d/3072))")
    p.add_argument("--ratio", default="1.0", help="fraction of the training split to poison, in (0, 1]")
    tables = [ATTACKS.get(attack).presets()] if attack in ATTACKS else [ATTACKS.get(n).presets() for n in ATTACKS]
    add_preset(p, tables)
    p.add_argument("--resume", action="store_true", help="continue a killed run from OUT.report/checkpoints")
    p.add_argument("--from-perturbation", default=None, metavar="FILE",
                   help="add this released perturbation (.npy/.pt) instead of crafting one")
    add_format(p)
    add_overwrite(p)
    add_device_seed(p)
    add_quiet(p)
    if attack in ATTACKS:
        cls = ATTACKS.get(attack)
        add_method_flags(p, cls.PARAMS, cls.param_defaults(), set(), f"parameters of --attack {attack}")
    p.set_defaults(func=run)


def parse_ratio(text: str) -> float:
    r = parse_fraction(text, "--ratio")
    if not (0 < r <= 1) or not math.isfinite(r):
        raise UserError(f"--ratio must be in (0, 1], got {text}")
    return r


def run(args: argparse.Namespace) -> int:
    timer = Timer()
    ratio = parse_ratio(args.ratio)
    if args.attack is None and args.from_perturbation is None:
        raise UserError("give --attack NAME or --from-perturbation FILE")
    cls = ATTACKS.get(args.attack) if args.attack else None
    given = given_params(args, None if cls is None else cls.PARAMS, f"--attack {args.attack}")
    eps = parse_fraction(args.eps, "--eps") if args.eps is not None else None
    check_dataset_output(args.output, args.input, args.overwrite)
    with timer("load"):
        ds = load_dataset(args.input)
    check_dataset_output(args.output, args.input, args.overwrite, ds, args.format)
    rdir = report_dir(args.output)
    crafted = args.from_perturbation is None
    preset = announce_preset(args, [cls.presets()]) if crafted and cls is not None else "paper"
    res = poison_dataset(ds, args.attack, given, eps=eps, norm=args.norm, ratio=ratio, seed=args.seed,
                         device=args.device, progress=not args.quiet, preset=preset, scale_eps=not args.no_scale_eps,
                         checkpoint_dir=rdir / "checkpoints", resume=args.resume, perturbation=args.from_perturbation,
                         timer=timer)
    name = args.attack if crafted else "from-perturbation"
    p = write_poison_outputs(ds, res, args.output, rdir, name, {"input": args.input, "output": args.output,
                             "from_perturbation": args.from_perturbation}, args.seed, timer, args.format,
                             args.overwrite)
    info = res.info
    print(f"poisoned {len(res.indices)}/{len(ds.x_train)} images with {name} ({info.get('norm')} bound "
          f"{info.get('eps', 0):.4g}, max per image {info['bound_check']['max_' + info['norm']]:.4g}); "
          f"PSNR {p:.2f} dB; wrote {args.output} and {rdir}/")
    return 0
