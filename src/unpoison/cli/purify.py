"""``unpoison purify IN OUT --method NAME``: purify a training split, write it and a report.

The training split is purified; the test split is copied unchanged. OUT keeps IN's format unless
``--format`` says otherwise and is written atomically. Beside OUT, ``OUT.report/`` holds
``manifest.json`` (config, versions, seed, timings, PSNR per stage), ``grid.png`` (input / stages /
output / amplified residual) and the purifier's arrays (e.g. D-VAE's stage-1 ``p_hat.npy``).
Method parameters are flags generated from each purifier's ``PARAMS`` table.

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
from pathlib import Path
from typing import Any

from .. import distributed
from ..data import load_dataset, save_dataset
from ..defenses import DEFENSES, make_purifier
from ..errors import UserError
from ..stream import psnr_arrays
from ..utils import Timer, manifest, move_file_atomic, save_npy_atomic, write_json
from ..viz import residual_image, save_image_grid
from ._common import (
    add_device_seed,
    add_format,
    add_memory_budget,
    add_overwrite,
    add_param_flags,
    add_quiet,
    check_dataset_output,
    given_params,
    param_flags,
    report_dir,
)

#: flags handled here, never generated from PARAMS
_COMMON = {"device", "seed", "progress", "checkpoint_dir", "resume"}


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="purify a (poisoned) training set", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="dataset spec to purify")
    p.add_argument("output", help="where to write the purified dataset")
    p.add_argument("--method", default="dvae", choices=DEFENSES.names(), help="purifier (default dvae)")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
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
    add_param_flags(p, param_flags(DEFENSES, _COMMON))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    launched = bool(os.environ.get(distributed.LAUNCHED_ENV))
    if args.nproc is not None and not launched:
        if args.nproc < 1:
            raise UserError(f"--nproc must be >= 1, got {args.nproc}")
        if args.nproc > 1:
            if not DEFENSES.get(args.method).supports_streaming:
                raise UserError(f"--method {args.method} runs in one process; drop --nproc")
            check_dataset_output(args.output, args.input, args.overwrite)  # refused before any process starts
            return distributed.launch(args.nproc, list(getattr(args, "argv", [])), "unpoison purify")
    if not 1 <= args.dist_timeout <= 7 * 86400:
        raise UserError(f"--dist-timeout must be in [1, 604800] seconds, got {args.dist_timeout}")
    ctx, device = distributed.init(args.device, args.dist_timeout)
    try:
        with distributed.peer_loss_is_one_line(ctx):
            return _run(args, ctx, device)
    finally:
        distributed.shutdown(ctx)


def _check_output_once(ctx: distributed.DistContext, args: argparse.Namespace, ds: Any = None) -> None:
    """Rank 0 checks OUT (and undoes a dead writer's leftovers); every rank gets its verdict."""
    err = None
    if ctx.main:
        try:
            check_dataset_output(args.output, args.input, args.overwrite, ds, args.format)
        except UserError as e:
            err = str(e)
            if not ctx.active:
                raise
    err = ctx.broadcast_object(err)
    if err:
        raise UserError(err)


def _run(args: argparse.Namespace, ctx: distributed.DistContext, device: Any) -> int:
    timer = Timer()
    _check_output_once(ctx, args)
    with timer("load"):
        ds = load_dataset(args.input, mmap=True)  # an npy folder stays on disk; other formats load whole
    _check_output_once(ctx, args, ds)
    cls = DEFENSES.get(args.method)
    streams = cls.supports_streaming
    if not streams and ctx.active:
        raise UserError(f"--method {args.method} runs in one process; drop --nproc (or torchrun)")
    if not streams and args.memory_budget is not None:
        can = ", ".join(n for n in DEFENSES.names() if DEFENSES.get(n).supports_streaming)
        raise UserError(f"--method {args.method} holds the split in memory; --memory-budget applies to {can}")
    accepted = cls.PARAMS
    given = given_params(args)
    unused = sorted(set(given) - set(accepted))
    if unused:
        raise UserError(f"--method {args.method} takes no {', '.join('--' + u.replace('_', '-') for u in unused)}")
    params: dict[str, Any] = dict(given)
    common = {"device": device, "seed": args.seed, "progress": not args.quiet and ctx.main}
    params.update({k: v for k, v in common.items() if k in cls.COMMON})
    rdir = report_dir(args.output)
    if cls.supports_checkpoint:
        params["checkpoint_dir"] = str(rdir / "checkpoints")
        params["resume"] = args.resume
    elif args.resume:
        raise UserError(f"--method {args.method} has nothing to resume (it does not checkpoint)")
    if streams:
        params.update(memory_budget=args.memory_budget, dist=ctx)
    purifier = make_purifier(args.method, **params)
    if streams and ctx.main:
        print(f"unpoison purify: {purifier.plan(ds.x_train)['line']}"
              + (f"; {ctx.world} processes ({ctx.backend})" if ctx.active else ""), flush=True)
    with timer("purify"):
        x_out = purifier.fit_purify(ds.x_train, ds.y_train)
    if not ctx.main:
        return 0  # rank 0 writes the output and the report
    out_ds = ds.replace(x_train=x_out)
    with timer("write"):
        save_dataset(out_ds, args.output, args.format, overwrite=args.overwrite)
    stats = {"psnr_input_output": psnr_arrays(ds.x_train, x_out), **purifier.info_}
    for k, arr in purifier.extras_.items():
        own = getattr(purifier, "extra_files_", {}).get(k)  # a streamed array: its file is moved, not copied
        if own is not None and Path(own).is_file():
            move_file_atomic(own, rdir / f"{k}.npy")
        else:
            save_npy_atomic(rdir / f"{k}.npy", arr)
    g = _GRID
    rows = {"input": ds.x_train[:g], **{k: v[:g] for k, v in purifier.stages_.items()}, "output": x_out[:g],
            "residual (amplified)": residual_image(ds.x_train[:g], x_out[:g])}
    save_image_grid(rows, rdir / "grid.png", title=f"{args.method}: PSNR {stats['psnr_input_output']:.2f} dB")
    cfg = {"method": args.method, "params": purifier.get_params(), "input": args.input, "output": args.output,
           "format": args.format or ds.format, "memory_budget": args.memory_budget,
           "processes": ctx.world}
    write_json(rdir / "manifest.json", manifest("purify", cfg, args.seed, timer.times, stats=stats,
                                                 n_train=int(len(ds.x_train))))
    if streams and hasattr(purifier, "close"):
        purifier.close()
    print(f"purified {len(x_out)} images with {args.method}: PSNR(input, output) = "
          f"{stats['psnr_input_output']:.2f} dB; wrote {args.output} and {rdir}/")
    return 0


#: images per row of the report's grid
_GRID = 8
