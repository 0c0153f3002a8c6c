"""``unpoison scan DATA``: is this dataset poisoned? A verdict before anyone trains on it.

Scans DATA's training split with signals that separate availability-poisoned from clean data (see
:mod:`unpoison.scan`): a naive Bayes and a linear model's held-out accuracy, a class-conditional residual
pattern, and (opt in) a small CNN's held-out accuracy, each fitted on one half and measured on the other.
The verdict needs no null for the kind of data: each statistic is compared with the same statistic on
the same images after a transformation no small poison survives (2x2 average, resize back, 8 grey
levels); a poison makes the data easier than its content, by more than content alone was measured to.
``--clean-reference SPEC`` adds a test against a small clean labelled sample of the same kind of images
(any dataset spec; its training split). On 28x28 grey images of the sizes it was measured at, the
shipped Fashion-MNIST null is one more check. Prints the verdict (poisoned or not), its score (the
largest test statistic in units of its threshold: >= 1 is poisoned), the kind it looks like (class-wise /
sample-wise) and the evidence; ``--json`` prints one JSON object instead. Exit code 0 whatever the
verdict. ``--samples OUT.csv`` also writes the per-sample scores and flags (``index,label,score,flag``,
as ``unpoison detect`` does).
"""

from __future__ import annotations

import argparse
import json

from ..data import check_file_output, load_dataset
from ..detect import DetectResult, write_scores_csv
from ..errors import UserError
from ..outputs import policy_for
from ..scan import DEFAULT_SELF_THRESHOLD, DEFAULT_SIGNALS, DEFAULT_THRESHOLD, SIGNALS, ScanConfig, scan
from ..utils import Timer, manifest, to_json, write_json
from ._common import add_device_seed, add_overwrite, add_quiet


def add_parser(sub: argparse._SubParsersAction, name: str, argv: list[str] | None = None) -> None:
    p = sub.add_parser(name, help="is this dataset poisoned? (a verdict, a score and the evidence)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="dataset spec (its training split is scanned)")
    p.add_argument("--json", action="store_true", help="print one JSON object (poisoned, score, kind, evidence)")
    p.add_argument("--samples", default=None, metavar="OUT.csv", help="also write per-sample scores and flags")
    p.add_argument("--threshold", type=float, default=DEFAULT_SELF_THRESHOLD,
                   help=f"spreads beyond its margin at which a self-calibrated test (or the clean-reference "
                        f"test) says poisoned (default {DEFAULT_SELF_THRESHOLD:g})")
    p.add_argument("--null-threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"|z| against the shipped Fashion-MNIST null at which that check says poisoned, where it "
                        f"applies (default {DEFAULT_THRESHOLD:g})")
    p.add_argument("--clean-reference", default=None, metavar="SPEC",
                   help="a small clean labelled sample of the same kind of images (a dataset spec; its training "
                        "split): adds a test against it")
    p.add_argument("--signals", default=",".join(DEFAULT_SIGNALS),
                   help=f"comma-separated subset of {', '.join(SIGNALS)}")
    p.add_argument("--cnn-epochs", type=int, default=None, help="small-CNN epochs per half (default 4)")
    add_overwrite(p)
    add_device_seed(p)
    add_quiet(p)
    p.set_defaults(func=run)


def scan_config(args: argparse.Namespace) -> object:
    """The :class:`ScanConfig` the flags ask for (shared with ``detect --method signals``)."""
    cfg = ScanConfig(self_threshold=args.threshold,
                     signals=tuple(s.strip() for s in args.signals.split(",") if s.strip()))
    if getattr(args, "null_threshold", None) is not None:
        cfg.threshold = args.null_threshold
        if not cfg.threshold > 0:
            raise UserError(f"--null-threshold must be > 0, got {cfg.threshold}")
    if args.cnn_epochs is not None:
        if args.cnn_epochs < 1:
            raise UserError(f"--cnn-epochs must be >= 1, got {args.cnn_epochs}")
        cfg.cnn_epochs = args.cnn_epochs
    if not cfg.self_threshold > 0:
        raise UserError(f"--threshold must be > 0, got {cfg.self_threshold}")
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
        ref = None
        if args.clean_reference is not None:
            rds = load_dataset(args.clean_reference)
            if rds.y_train is None:
                raise UserError("the clean reference needs a labelled training split", args.clean_reference)
            ref = (rds.x_train, rds.y_train)
    if ds.y_train is None:
        raise UserError("the scan needs a labelled training split", args.data)
    with timer("scan"):
        try:
            res = scan(ds.x_train, ds.y_train, cfg, seed=args.seed, device=args.device,
                       progress=not args.quiet and not args.json, clean_reference=ref)
        except UserError as e:
            if ref is not None and "clean reference" in str(e):
                raise UserError(str(e), args.clean_reference) from None
            raise
    out = {"data": args.data, "clean_reference": args.clean_reference, **res.summary()}
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
    fired = res.info["verdict"]["fired"]
    print(f"{args.data}: {verdict} (score {res.score:.2f}: poisoned at >= 1"
          f"{', kind ' + res.kind if res.kind else ''}{'; fired: ' + ', '.join(fired) if fired else ''})")
    for s, e in res.evidence.items():
        line = (f"  {s:8s} {e['stat']:8.4g}  content reference {e['self_ref']:.4g}: effect {e['self_effect']:+.3g} "
                f"(margin {e['self_margin']:.3g}, sd {e['self_sd']:.2g}, z {e['self_z']:+.1f}"
                f"{'' if 'self:' + s in res.info['verdict']['tests'] else '; evidence only'})")
        if "clean_ref" in e:
            line += f"; clean reference {e['clean_ref']:.4g}: z {e['clean_z']:+.1f}"
        if "null_z" in e:
            line += f"; Fashion-MNIST null z {e['null_z']:+.1f}{'' if res.info['null_calibrated'] else ' (not used)'}"
        print(line)
    print(f"  {int(res.flags.sum())} of {len(res.flags)} training images flagged; "
          f"{res.info['timings_s']['total']:.0f} s")
    if args.samples is not None:
        print(f"wrote {args.samples}")
    return 0
