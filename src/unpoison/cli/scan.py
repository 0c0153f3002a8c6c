"""``unpoison scan DATA``: is this dataset poisoned? A verdict before anyone trains on it.

Scans DATA's training split with signals that separate availability-poisoned from clean data without a
clean reference (see :mod:`unpoison.scan`): a naive Bayes and a linear model's held-out accuracy, a
class-conditional residual pattern, and a small CNN's held-out accuracy after a few epochs, each fitted
on one half and measured on the other, each compared with a null measured on clean data. Prints the
verdict (poisoned or not), its score (the largest |z| against the null), the kind it looks like
(class-wise / sample-wise) and the evidence; ``--json`` prints one JSON object instead. Exit code 0
whatever the verdict. ``--samples OUT.csv`` also writes the per-sample scores and flags
(``index,label,score,flag``, as ``unpoison detect`` does).
"""

from __future__ import annotations

import argparse
import json

from ..data import check_file_output, load_dataset
from ..detect import DetectResult, write_scores_csv
from ..errors import UserError
from ..outputs import policy_for
from ..scan import DEFAULT_SIGNALS, DEFAULT_THRESHOLD, SIGNALS, ScanConfig, scan
from ..utils import Timer, manifest, to_json, write_json
from ._common import add_device_seed, add_overwrite, add_quiet


def add_parser(sub: argparse._SubParsersAction, name: str, argv: list[str] | None = None) -> None:
    p = sub.add_parser(name, help="is this dataset poisoned? (a verdict, a score and the evidence)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="dataset spec (its training split is scanned)")
    p.add_argument("--json", action="store_true", help="print one JSON object (poisoned, score, kind, evidence)")
    p.add_argument("--samples", default=None, metavar="OUT.csv", help="also write per-sample scores and flags")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"|z| at which the verdict is poisoned (default {DEFAULT_THRESHOLD:g})")
    p.add_argument("--signals", default=",".join(DEFAULT_SIGNALS),
                   help=f"comma-separated subset of {', '.join(SIGNALS)}")
    p.add_argument("--cnn-epochs", type=int, default=None, help="small-CNN epochs per half (default 4)")
    add_overwrite(p)
    add_device_seed(p)
    add_quiet(p)
    p.set_defaults(func=run)


def scan_config(args: argparse.Namespace) -> object:
    """The :class:`ScanConfig` the flags ask for (shared with ``detect --method signals``)."""
    cfg = ScanConfig(threshold=args.threshold,
                     signals=tuple(s.strip() for s in args.signals.split(",") if s.strip()))
    if args.cnn_epochs is not None:
        if args.cnn_epochs < 1:
            raise UserError(f"--cnn-epochs must be >= 1, got {args.cnn_epochs}")
        cfg.cnn_epochs = args.cnn_epochs
    if not cfg.threshold > 0:
        raise UserError(f"--threshold must be > 0, got {cfg.threshold}")
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = scan_config(args)
    if args.samples is not None:
        if not args.samples.lower().endswith(".csv"):
            raise UserError("--samples must name a .csv file", args.samples)
        check_file_output(args.samples, [args.data], args.overwrite)
    timer = Timer()
    with timer("load"):
        ds = load_dataset(args.data)
    if ds.y_train is None:
        raise UserError("the scan needs a labelled training split", args.data)
    with timer("scan"):
        res = scan(ds.x_train, ds.y_train, cfg, seed=args.seed, device=args.device,
                   progress=not args.quiet and not args.json)
    out = {"data": args.data, **res.summary()}
    if args.samples is not None:
        check_file_output(args.samples, [args.data], args.overwrite, [ds.source])
        write_scores_csv(args.samples, DetectResult(res.sample_scores, res.flags, res.info), ds.y_train,
                         policy_for(args.overwrite, dataset=False))
        write_json(args.samples + ".json", manifest("scan", {"data": args.data, "config": res.info["config"]},
                                                    args.seed, timer.times, result=out))
    if args.json:
        print(json.dumps(json.loads(to_json(out)), separators=(",", ":")))
        return 0
    verdict = "POISONED" if res.poisoned else "no poison found"
    print(f"{args.data}: {verdict} (score {res.score:.2f}, threshold {cfg.threshold:g}"  # type: ignore[attr-defined]
          f"{', kind ' + res.kind if res.kind else ''}{'' if res.info['calibrated'] else ', UNCALIBRATED null'})")
    for s, e in res.evidence.items():
        z = f"z {e['z']:+.2f} (null {e['null_mean']:.3g} ± {e['null_sd']:.3g})" if "z" in e else "no null"
        print(f"  {s:8s} {e['stat']:10.4g}  {z}")
    print(f"  {int(res.flags.sum())} of {len(res.flags)} training images flagged; "
          f"{res.info['timings_s']['total']:.0f} s")
    if args.samples is not None:
        print(f"wrote {args.samples}")
    return 0
