"""``unpoison detect DATA OUT.csv``: score and flag each training image as poisoned.

``--method signals`` (default) uses the scan's fits (``unpoison scan``; tuned by ``--threshold``,
``--signals``, ``--cnn-epochs``): nothing is flagged in a set the scan judges clean; the score is the
scan's per-sample score. ``--method dvae`` is the paper's rule (Table 7): it fits the D-VAE's first
stage on DATA's training split, trains a classifier on x0 + p_hat0 and flags the images that classifier
fits (predicts their label on the original x0); its score is the probability of the true label, and
``--preset`` (default auto: paper on CUDA, cpu on CPU) sizes both the stage-1 D-VAE and the classifier.
OUT.csv has ``index,label,score,flag`` (flag 1 = poisoned), written atomically; OUT.csv.json is the
run's manifest.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from ..data import check_file_output, load_dataset
from ..defenses import DEFENSES
from ..defenses.dvae import DVAE_PRESETS
from ..detect import METHODS, detect, write_scores_csv
from ..errors import UserError
from ..models import list_models
from ..outputs import policy_for
from ..scan import DEFAULT_SELF_THRESHOLD, DEFAULT_SIGNALS
from ..train import SCORING_PRESETS, TrainConfig
from ..utils import Timer, manifest, write_json
from ._common import add_device_seed, add_overwrite, add_preset, add_quiet, announce_preset
from .scan import scan_config


def _tables() -> list:
    return [SCORING_PRESETS, DVAE_PRESETS]


def add_parser(sub: argparse._SubParsersAction, name: str, argv: list[str] | None = None) -> None:
    p = sub.add_parser(name, help="flag poisoned training images (stage-1 p_hat rule)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="dataset spec (its training split is scored)")
    p.add_argument("output", help="CSV to write")
    p.add_argument("--method", default="signals", choices=METHODS, help="signals (the scan's; default) or dvae")
    p.add_argument("--threshold", type=float, default=DEFAULT_SELF_THRESHOLD,
                   help="signals: the scan's threshold (spreads beyond the margin; see unpoison scan)")
    p.add_argument("--signals", default=",".join(DEFAULT_SIGNALS), help="signals: which of the scan's signals")
    p.add_argument("--cnn-epochs", type=int, default=None, help="signals: small-CNN epochs per half")
    p.add_argument("--detector", default="dvae",
                   help="dvae method: purifier whose stage-1 p_hat is used "
                        f"(default dvae; any of {', '.join(DEFENSES.names())})")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="detector parameter (repeatable), e.g. --param epochs=20")
    add_preset(p, _tables())
    p.add_argument("--model", default=None, choices=list_models(), help="classifier (overrides the preset)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--no-flip", action="store_true", help="no horizontal flip augmentation")
    add_overwrite(p)
    add_device_seed(p)
    add_quiet(p)
    p.set_defaults(func=run)


def _params(items: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k:
            raise UserError(f"bad --param {it!r}; expected KEY=VALUE")
        out[k.strip().replace("-", "_")] = yaml.safe_load(v)
    return out


def run(args: argparse.Namespace) -> int:
    if not args.output.lower().endswith(".csv"):
        raise UserError("output must be a .csv file", args.output)
    params = _params(args.param)
    timer = Timer()
    check_file_output(args.output, [args.data], args.overwrite)
    with timer("load"):
        ds = load_dataset(args.data)
    check_file_output(args.output, [args.data], args.overwrite, [ds.source])
    conf: dict[str, object] = {"data": args.data, "output": args.output, "method": args.method}
    if args.method == "signals":
        scfg = scan_config(args)
        with timer("detect"):
            res = detect(ds.x_train, ds.y_train, "signals", scfg, seed=args.seed, device=args.device,
                         progress=not args.quiet)
        conf["scan"] = res.info["scan"]["config"]
    else:
        preset = announce_preset(args, _tables())
        cfg = TrainConfig.preset(preset, model=args.model, epochs=args.epochs)
        if args.no_flip:
            cfg.flip = False
        with timer("detect"):
            res = detect(ds.x_train, ds.y_train, "dvae", seed=args.seed, device=args.device,
                         progress=not args.quiet, purifier=args.detector, params=params, train_config=cfg,
                         preset=preset)
        conf.update(detector=args.detector, params=params, preset=preset, train=vars(cfg))
    write_scores_csv(args.output, res, ds.y_train, policy_for(args.overwrite, dataset=False))
    write_json(Path(args.output + ".json"), manifest("detect", conf, args.seed, timer.times, result=res.info))
    print(f"flagged {int(res.flags.sum())} of {len(res.flags)} training images as poisoned; wrote {args.output}")
    return 0
