"""``unpoison purify IN OUT --method NAME``: purify a training split, write it and a report.

The training split is purified; the test split is copied unchanged. OUT keeps IN's format unless
``--format`` says otherwise and is written atomically. Beside OUT, ``OUT.report/`` holds
``manifest.json`` (config, versions, seed, timings, PSNR per stage), ``grid.png`` (input / stages /
output / amplified residual), ``report.md`` and the purifier's arrays (e.g. D-VAE's stage-1 ``p_hat.npy``).
``--reference CLEAN`` (the same images before poisoning) measures how much poison each stage removed:
corr(p_hat, p), the poison energy removed, the poison left and the PSNR to the clean images after each
stage, on all images and on the poisoned ones; ``residual.png`` shows p, p_hat and p - p_hat side by
side; ``--reference-test`` adds the paper's Table 1 check (a classifier training).
Method parameters are flags generated from the chosen purifier's ``PARAMS`` table: ``unpoison purify
--method NAME --help`` lists them with their ranges and defaults. ``--preset`` (default auto: paper on CUDA,
cpu on CPU) sizes the purifiers that have presets (dvae, vae, ae).

Larger than memory: an ``npy`` folder is memory-mapped, and when its training split does not fit
``--memory-budget`` (default: half the free memory of the device) the auto-encoder methods (dvae, vae,
ae) stream it from disk and write every stage by rows into ``OUT.report/checkpoints/``; the result is
the same as in memory. Several processes: ``--nproc N`` (this machine; one GPU each, or CPU processes
with gloo), or ``torchrun --nproc-per-node N [--nnodes ...] -m unpoison purify ...`` for several
machines (IN and OUT on a file system every machine sees; see the README).
"""

from __future__ import annotations

import argparse
import os

from .. import distributed
from ..defenses import DEFENSES
from ..defenses.dvae import DVAE_PRESETS
from ..errors import UserError
from ..pipeline.jobs import PurifyJob, launch_purify_job, run_purify_job, summary_lines
from ..presets import choose
from ._common import (
    add_device_seed,
    add_format,
    add_memory_budget,
    add_method_flags,
    add_overwrite,
    add_preset,
    add_quiet,
    announce_preset,
    given_params,
    peek,
)

#: flags handled here, never generated from PARAMS
_COMMON = {"device", "seed", "progress", "checkpoint_dir", "resume", "preset"}
_DEFAULT = "dvae"


def add_parser(sub: argparse._SubParsersAction, name: str, argv: list[str] | None = None) -> None:
    method = peek(argv, "--method")
    method = method if method in DEFENSES else _DEFAULT
    p = sub.add_parser(name, help="purify a (poisoned) training set", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="dataset spec to purify")
    p.add_argument("output", help="where to write the purified dataset")
    p.add_argument("--method", default=_DEFAULT, choices=DEFENSES.names(),
                   help="; ".join(f"{n}: {DEFENSES.help(n)}" for n in DEFENSES.names()).replace("%", "%%"))
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    cls = DEFENSES.get(method)
    add_preset(p, [DVAE_PRESETS])  # methods without presets (jpeg, bdr, ...) have nothing for it to size
    add_format(p)
    add_overwrite(p)
    add_device_seed(p)
    add_quiet(p)
    add_memory_budget(p)
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train and purify with N processes on this machine (launches torch.distributed.run; "
                        "one GPU each, or CPU processes with gloo); for several machines run torchrun yourself")
    p.add_argument("--dist-timeout", type=float, default=distributed.DEFAULT_TIMEOUT_S, metavar="S",
                   help="seconds a process waits for the others before the job stops (default %(default)s)")
    add_method_flags(p, cls.PARAMS, cls.param_defaults(), _COMMON, f"parameters of --method {method}")
    g = p.add_argument_group("measuring against the clean images")
    g.add_argument("--reference", metavar="CLEAN", default=None,
                   help="dataset spec whose training split holds the same images before poisoning (same order, "
                        "same labels): the report then says, per stage, how much poison was removed "
                        "(corr(p_hat, p), poison energy removed, poison left, PSNR to the clean images; on all "
                        "images and on the poisoned ones) and residual.png shows p, p_hat and p - p_hat")
    g.add_argument("--reference-test", action="store_true",
                   help="with --reference and a purifier that has a stage-1 p_hat (dvae): also the paper's Table 1 "
                        "check: train a classifier (the scoring protocol at --preset) on clean + p_hat and score it "
                        "on the clean test images (low = p_hat is the poison) and on the poisoned ones; costs a "
                        "classifier training")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cls = DEFENSES.get(args.method)
    params = given_params(args, cls.PARAMS, f"--method {args.method}")
    preset = None
    if "preset" in cls.COMMON:  # said once (by rank 0 under torchrun); every rank resolves the same name
        rank0 = os.environ.get("RANK", "0") == "0"
        preset = announce_preset(args, [DVAE_PRESETS]) if rank0 else choose(args.preset, args.device)[0]
    job = PurifyJob(args.input, args.output, args.method, params, preset, args.format, args.overwrite, args.seed,
                    str(args.device), args.quiet, args.resume, args.memory_budget, args.reference,
                    args.reference_test, args.dist_timeout)
    if args.nproc is not None and not os.environ.get(distributed.LAUNCHED_ENV):
        if args.nproc < 1:
            raise UserError(f"--nproc must be >= 1, got {args.nproc}")
        if args.nproc > 1:
            return launch_purify_job(job, args.nproc)
    res = run_purify_job(job)
    if res is not None:
        print("\n".join(summary_lines(res, job)))
    return 0
