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
--method NAME --help`` lists them with their defaults. ``--preset`` (default auto: paper on CUDA, cpu on
CPU) sizes the purifiers that have presets (dvae, vae, ae).

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

import numpy as np

from .. import distributed
from ..data import ImageDataset, load_dataset, save_dataset, spec_path
from ..defenses import DEFENSES, make_purifier
from ..defenses.dvae import DVAE_PRESETS
from ..errors import UserError
from ..presets import choose
from ..stream import psnr_arrays
from ..utils import Timer, manifest, move_file_atomic, save_npy_atomic, write_json, write_text_atomic
from ..viz import residual_image, save_image_grid
from ._common import (
    add_device_seed,
    add_format,
    add_memory_budget,
    add_method_flags,
    add_overwrite,
    add_preset,
    add_quiet,
    announce_preset,
    check_dataset_output,
    given_params,
    peek,
    report_dir,
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
    _add_reference_flags(p)
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
    _check_reference_args(args)
    with timer("load"):
        ds = load_dataset(args.input, mmap=True)  # an npy folder stays on disk; other formats load whole
    _check_output_once(ctx, args, ds)
    ref = _load_reference(args, ds, timer) if args.reference else None
    cls = DEFENSES.get(args.method)
    streams = cls.supports_streaming
    if not streams and ctx.active:
        raise UserError(f"--method {args.method} runs in one process; drop --nproc (or torchrun)")
    if not streams and args.memory_budget is not None:
        can = ", ".join(n for n in DEFENSES.names() if DEFENSES.get(n).supports_streaming)
        raise UserError(f"--method {args.method} holds the split in memory; --memory-budget applies to {can}")
    params: dict[str, Any] = given_params(args, cls.PARAMS, f"--method {args.method}")
    preset = None
    if "preset" in cls.COMMON:  # said once, by rank 0; every rank resolves the same name
        preset = announce_preset(args, [DVAE_PRESETS]) if ctx.main else choose(args.preset, args.device)[0]
    rdir = report_dir(args.output)
    if streams:
        params.update(memory_budget=args.memory_budget, dist=ctx)
    purifier = make_purifier(args.method, device=device, seed=args.seed, progress=not args.quiet and ctx.main,
                             preset=preset, checkpoint_dir=str(rdir / "checkpoints") if cls.supports_checkpoint
                             else None, resume=args.resume, **params)
    if args.reference_test:
        _check_reference_test(args, purifier)
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
    measured = _measure(args, ds, ref, purifier, x_out, rdir, preset, timer) if ref is not None else _unmeasured(rdir)
    cfg = {"method": args.method, "params": purifier.get_params(), "input": args.input, "output": args.output,
           "format": args.format or ds.format, "memory_budget": args.memory_budget, "processes": ctx.world,
           "reference": args.reference, "reference_test": args.reference_test}
    write_json(rdir / "manifest.json", manifest("purify", cfg, args.seed, timer.times, stats=stats,
                                                 n_train=int(len(ds.x_train)), reference=measured))
    _write_report_md(rdir, args, stats, measured, timer.times)
    if streams and hasattr(purifier, "close"):
        purifier.close()
    print(f"purified {len(x_out)} images with {args.method}: PSNR(input, output) = "
          f"{stats['psnr_input_output']:.2f} dB; wrote {args.output} and {rdir}/")
    return 0


#: images per row of the report's grid
_GRID = 8


# --- --reference: measure against the clean images (kept apart from the purify flow above) ---------------------
def _add_reference_flags(p: argparse.ArgumentParser) -> None:
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


def _check_reference_args(args: argparse.Namespace) -> None:
    """Before any work: --reference-test needs --reference, and OUT (or its report folder) is never CLEAN."""
    from ..outputs import guard_inputs

    if args.reference_test and not args.reference:
        raise UserError("--reference-test needs --reference CLEAN (the clean images it trains on)")
    if args.reference:
        ref_path = spec_path(args.reference)
        guard_inputs(args.output, [ref_path])
        guard_inputs(report_dir(args.output), [ref_path])


def _load_reference(args: argparse.Namespace, ds: ImageDataset, timer: Timer) -> ImageDataset:
    """CLEAN, checked against IN (count, image shape, labels, in order) before any purification starts."""
    from ..disentangle import reference_problem
    from ..outputs import guard_inputs

    with timer("load_reference"):
        ref = load_dataset(args.reference)
    guard_inputs(args.output, [ref.source])
    guard_inputs(report_dir(args.output), [ref.source])
    why = reference_problem(ref.x_train, ref.y_train, ds.x_train, ds.y_train)
    if why:
        raise UserError(f"--reference is not the clean version of the input (the same images before poisoning, "
                        f"in the same order, with the same labels): {why}", args.reference)
    if args.reference_test and not ref.has_test and not ds.has_test:
        raise UserError("--reference-test scores on clean test images, but neither CLEAN nor the input has a "
                        "test split", args.reference)
    return ref


def _check_reference_test(args: argparse.Namespace, purifier: Any) -> None:
    """Table 1 adds stage 1's p_hat to the clean images: refuse a purifier without one before it trains."""
    cfg = getattr(purifier, "config", None)
    if not hasattr(purifier, "estimate_perturbation") or getattr(cfg, "skip_stage1", False):
        extra = " with --skip-stage1 true" if getattr(cfg, "skip_stage1", False) else ""
        raise UserError(f"--reference-test needs a stage-1 p_hat; --method {args.method}{extra} has none "
                        f"(use dvae with its stage 1, or drop --reference-test)")


def _scoring_preset(preset: str | None, device: str) -> str:
    """The scoring protocol's preset for the command's --preset: the same name where the scoring family has it,
    ``paper`` for a D-VAE preset it lacks (imagenet: full-size data), ``auto`` by device for methods without one."""
    from ..train import SCORING_PRESETS

    if preset is None:
        return SCORING_PRESETS.resolve("auto", device)
    return SCORING_PRESETS.resolve(preset, device) if preset in SCORING_PRESETS.choices() else "paper"


def _measure(args: argparse.Namespace, ds: ImageDataset, ref: ImageDataset, purifier: Any, x_out: np.ndarray,
             rdir: Path, preset: str | None, timer: Timer) -> dict[str, Any]:
    """Every stage against CLEAN (see :func:`unpoison.disentangle.purification_report`), the residual grid,
    and with --reference-test the Table 1 check. Returns what the manifest records under ``reference``."""
    from ..disentangle import (
        headline,
        poisoned_indices,
        purification_report,
        save_residual_grid,
        table1_check,
        true_perturbation,
    )

    print("measuring every stage against the clean images (--reference) ...", flush=True)
    p_hat = purifier.extras_.get("p_hat")
    with timer("measure"):
        rep = purification_report(ref.x_train, ds.x_train, x_out, purifier.stages_, p_hat, ds.y_train)
        sub = rep["poisoned"]["partial"]  # show poisoned images: an unpoisoned one has p = 0
        idx = (poisoned_indices(ref.x_train, ds.x_train) if sub else np.arange(len(ds.x_train)))[:8]
        p = true_perturbation(ref.x_train[idx], ds.x_train[idx])
        left = {"output - clean": x_out[idx].astype(np.float32) - ref.x_train[idx].astype(np.float32)}
        save_residual_grid(p, None if p_hat is None else np.asarray(p_hat)[idx], rdir / "residual.png",
                           x0=ds.x_train[idx], left=left,
                           title=f"{args.method}: true perturbation p, stage-1 p_hat, p - p_hat"
                           + (" (poisoned images)" if sub else ""))
    rep["residual_grid"] = "residual.png"
    if args.reference_test and p_hat is not None:
        from ..train import TrainConfig

        scoring = _scoring_preset(preset, args.device)
        test = ref if ref.has_test else ds
        print(f"Table 1 check: training a classifier (scoring preset {scoring}) on clean + p_hat, scored on the "
              f"clean test images of {'CLEAN' if ref.has_test else 'the input'} ...", flush=True)
        with timer("reference_test"):
            rep["table1"] = {"scoring_preset": scoring, "test_split_of": "reference" if ref.has_test else "input",
                             **table1_check(ref.x_train, ds.y_train, p_hat, ds.x_train, test.x_test, test.y_test,
                                            TrainConfig.preset(scoring), args.seed, args.device,
                                            progress=not args.quiet, classes=ds.classes)}
    h = headline(rep)
    rep["headline"] = h
    _print_measured(rep, h)
    return rep


def _unmeasured(rdir: Path) -> None:
    """No reference this run: an earlier run's residual grid in the same report folder would mislead; remove it."""
    (rdir / "residual.png").unlink(missing_ok=True)


def _fmt(v: float | None, spec: str = "{:.3f}") -> str:
    return "n/a" if v is None else spec.format(v)


def _print_measured(rep: dict[str, Any], h: dict[str, float | None]) -> None:
    pz = rep["poisoned"]
    print(f"reference: {pz['n']} of {pz['of']} images poisoned; PSNR to clean: " + ", ".join(
        f"{k} {_fmt(v['psnr_to_clean'], '{:.2f}')} dB" for k, v in rep["all"]["stages"].items()))
    if "stage1_corr" in h:
        print(f"stage 1: corr(p_hat, p) {_fmt(h['stage1_corr'])} (quartiles {_fmt(h['stage1_corr_q25'])} / "
              f"{_fmt(h['stage1_corr_median'])} / {_fmt(h['stage1_corr_q75'])}), poison energy removed "
              f"{_fmt(h['stage1_energy_removed'], '{:.1%}')}, class-mean corr {_fmt(h['stage1_class_corr'])}")
    print(f"poison left in the output: {_fmt(h.get('poison_left'))} of p (1 = all of it, 0 = none)")
    t1 = rep.get("table1")
    if t1:
        print(f"Table 1 (trained on clean + p_hat): clean train {t1['acc_clean_train']:.2f}%, clean test "
              f"{t1['acc_clean_test']:.2f}%, poisoned {t1['acc_poisoned_train']:.2f}%")


def _write_report_md(rdir: Path, args: argparse.Namespace, stats: dict[str, Any], measured: dict[str, Any] | None,
                     times: dict[str, float]) -> None:
    """``report.md``: what ran, PSNR per stage, timings and, with --reference, the measurements."""
    from ..disentangle import report_markdown
    from ..errors import printable

    lines = [f"# unpoison purify --method {args.method}", "",
             f"- input: `{printable(args.input)}`", f"- output: `{printable(args.output)}`",
             f"- PSNR(input, output): {stats['psnr_input_output']:.2f} dB"]
    for k, v in (stats.get("psnr_db") or {}).items():
        lines.append(f"- PSNR {k}: {v:.2f} dB")
    lines.append("- time: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    lines += ["", "![input, stages, output](grid.png)", ""]
    if measured is None:
        lines += ["No --reference given: how much poison each stage removed is not measured (give the clean "
                  "images with --reference CLEAN).", ""]
    else:
        lines += [f"## Against the clean images (`{printable(args.reference)}`)", "", report_markdown(measured),
                  "![p, p_hat, p - p_hat, output - clean](residual.png)", ""]
        t1 = measured.get("table1")
        if t1:
            lines += ["## Table 1 check: a classifier trained on clean + p_hat", "",
                      f"Scoring preset {t1['scoring_preset']}; clean test images from the {t1['test_split_of']}. "
                      "If p_hat is the poison, the clean test accuracy is low and the poisoned one high.", "",
                      "| clean train T | clean test D | poisoned P |", "|---|---|---|",
                      f"| {t1['acc_clean_train']:.2f} | {t1['acc_clean_test']:.2f} | {t1['acc_poisoned_train']:.2f} |",
                      ""]
    write_text_atomic(rdir / "report.md", "\n".join(lines))
