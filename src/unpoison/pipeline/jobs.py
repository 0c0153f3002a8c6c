"""The ``purify`` command as data: a :class:`PurifyJob` and :func:`run_purify_job` (check OUT, load, purify
with :func:`~unpoison.pipeline.purify.purify_dataset`, measure, write the dataset and its report).

``unpoison purify`` builds a job from its flags and runs it; with ``--nproc N`` (and for a benchmark cell
given several GPUs) :func:`launch_purify_job` starts N ranks with ``torch.distributed.run``, each running
``python -m unpoison.pipeline.worker JOB.json``: the workers run this function, not the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import distributed
from ..data import ImageDataset, check_dataset_output, load_dataset, save_dataset, spec_path
from ..defenses import DEFENSES, make_purifier
from ..disentangle import headline, reference_problem, report_markdown, table1_check
from ..errors import UserError, printable, run_guarded
from ..outputs import guard_inputs, report_dir
from ..train import SCORING_PRESETS, TrainConfig
from ..utils import Timer, manifest, move_file_atomic, save_npy_atomic, write_json, write_text_atomic
from ..viz import residual_image, save_image_grid
from .purify import PurifyResult, purify_dataset

#: images per row of the report's grid
GRID = 8


@dataclass
class PurifyJob:
    """Everything ``unpoison purify IN OUT`` does, as JSON-able data (what each rank of a job gets)."""

    input: str
    output: str
    method: str = "dvae"
    params: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None  # resolved (never auto) for methods with presets
    format: str | None = None
    overwrite: bool = False
    seed: int = 0
    device: str = "auto"
    quiet: bool = False
    resume: bool = False
    memory_budget: str | None = None
    reference: str | None = None
    reference_test: bool = False
    dist_timeout: float = distributed.DEFAULT_TIMEOUT_S

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_job(job: PurifyJob, output: bool = True) -> None:
    """What can be refused before any process starts or any data is read (``output``: OUT too; the ranks of
    a job leave that to rank 0, which also undoes a dead writer's leftovers)."""
    cls = DEFENSES.get(job.method)
    if job.memory_budget is not None and not cls.tags.streaming:
        can = ", ".join(n for n in DEFENSES.names() if DEFENSES.get(n).tags.streaming)
        raise UserError(f"--method {job.method} holds the split in memory; --memory-budget applies to {can}")
    if not 1 <= job.dist_timeout <= 7 * 86400:
        raise UserError(f"--dist-timeout must be in [1, 604800] seconds, got {job.dist_timeout}")
    if job.reference_test and not job.reference:
        raise UserError("--reference-test needs --reference CLEAN (the clean images it trains on)")
    if output:
        check_dataset_output(job.output, job.input, job.overwrite)
    if job.reference:
        guard_inputs(job.output, [spec_path(job.reference)])
        guard_inputs(report_dir(job.output), [spec_path(job.reference)])


def launch_purify_job(job: PurifyJob, nproc: int) -> int:
    """Run ``job`` as ``nproc`` ranks on this machine (exit code: 0, or 2 after one line naming the rank)."""
    if not DEFENSES.get(job.method).tags.streaming:
        raise UserError(f"--method {job.method} runs in one process; drop --nproc")
    check_job(job)  # refused before any process starts
    fd, name = tempfile.mkstemp(prefix="unpoison-job-", suffix=".json")
    spec = Path(name)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(job.to_dict()))
    try:
        return distributed.launch(nproc, [str(spec)], "unpoison purify", module="unpoison.pipeline.worker")
    finally:
        spec.unlink(missing_ok=True)


def run_purify_job(job: PurifyJob) -> PurifyResult | None:
    """Run ``job`` in this process, joining the ranks of a ``torchrun`` job when started by one; rank 0 writes
    OUT and its report and gets the result, the other ranks ``None``."""
    check_job(job, output=False)
    ctx, device = distributed.init(job.device, job.dist_timeout)
    try:
        with distributed.peer_loss_is_one_line(ctx):
            return _run(job, ctx, device)
    finally:
        distributed.shutdown(ctx)


def _check_output_once(ctx: distributed.DistContext, job: PurifyJob, ds: Any = None) -> None:
    """Rank 0 checks OUT (and undoes a dead writer's leftovers); every rank gets its verdict."""
    err = None
    if ctx.main:
        try:
            check_dataset_output(job.output, job.input, job.overwrite, ds, job.format)
        except UserError as e:
            err = str(e)
            if not ctx.active:
                raise
    err = ctx.broadcast_object(err)
    if err:
        raise UserError(err)


def _say(ctx: distributed.DistContext) -> Any:
    return (lambda *a, **k: print(*a, **k, flush=True)) if ctx.main else (lambda *a, **k: None)


def _run(job: PurifyJob, ctx: distributed.DistContext, device: Any) -> PurifyResult | None:
    timer = Timer()
    say = _say(ctx)
    _check_output_once(ctx, job)
    cls = DEFENSES.get(job.method)
    if not cls.tags.streaming and ctx.active:
        raise UserError(f"--method {job.method} runs in one process; drop --nproc (or torchrun)")
    with timer("load"):
        ds = load_dataset(job.input, mmap=True)  # an npy folder stays on disk; other formats load whole
    _check_output_once(ctx, job, ds)
    ref = _load_reference(job, ds, timer) if job.reference else None
    rdir = report_dir(job.output)
    purifier = make_purifier(job.method, job.params, preset=job.preset, device=device, seed=job.seed,
                             progress=not job.quiet and ctx.main, checkpoint_dir=rdir / "checkpoints",
                             resume=job.resume, memory_budget=job.memory_budget, dist=ctx)
    if job.reference_test:
        _check_reference_test(job, purifier)
    if ref is not None:
        say("measuring every stage against the clean images (--reference) after purifying ...")
    res = purify_dataset(ds, job.method, purifier=purifier, clean=ref, residual_grid=rdir / "residual.png",
                         grid_title=f"{job.method}: true perturbation p, stage-1 p_hat, p - p_hat", timer=timer,
                         say=lambda line: say(f"unpoison purify: {line}"))
    if not ctx.main:
        return None  # rank 0 writes the output and the report
    if res.measured is not None:
        _reference_extras(job, ds, ref, res, timer, say)  # type: ignore[arg-type]
    else:
        (rdir / "residual.png").unlink(missing_ok=True)  # an earlier run's grid in the same folder would mislead
    write_purify_outputs(job, ds, res, rdir, timer)
    return res


# --- --reference: measure against the clean images ------------------------------------------------------------
def _load_reference(job: PurifyJob, ds: ImageDataset, timer: Timer) -> ImageDataset:
    """CLEAN, checked against IN (count, image shape, labels, in order) before any purification starts."""
    with timer("load_reference"):
        ref = load_dataset(job.reference)  # type: ignore[arg-type]
    guard_inputs(job.output, [ref.source])
    guard_inputs(report_dir(job.output), [ref.source])
    why = reference_problem(ref.x_train, ref.y_train, ds.x_train, ds.y_train)
    if why:
        raise UserError(f"--reference is not the clean version of the input (the same images before poisoning, "
                        f"in the same order, with the same labels): {why}", job.reference)
    if job.reference_test and not ref.has_test and not ds.has_test:
        raise UserError("--reference-test scores on clean test images, but neither CLEAN nor the input has a "
                        "test split", job.reference)
    return ref


def _check_reference_test(job: PurifyJob, purifier: Any) -> None:
    """Table 1 adds stage 1's p_hat to the clean images: refuse a purifier without one before it trains."""
    cfg = getattr(purifier, "config", None)
    if purifier.tags.p_hat != "infer" or getattr(cfg, "skip_stage1", False):
        extra = " with --skip-stage1 true" if getattr(cfg, "skip_stage1", False) else ""
        raise UserError(f"--reference-test needs a stage-1 p_hat; --method {job.method}{extra} has none "
                        f"(use dvae with its stage 1, or drop --reference-test)")


def scoring_preset(preset: str | None, device: Any) -> str:
    """The scoring protocol's preset for the command's --preset: the same name where the scoring family has it,
    ``paper`` for a D-VAE preset it lacks (imagenet: full-size data), ``auto`` by device for methods without one."""
    if preset is None:
        return SCORING_PRESETS.resolve("auto", device)
    return SCORING_PRESETS.resolve(preset, device) if preset in SCORING_PRESETS.choices() else "paper"


def _reference_extras(job: PurifyJob, ds: ImageDataset, ref: ImageDataset, res: PurifyResult, timer: Timer,
                      say: Any) -> None:
    """The headline of the measurements, and with --reference-test the paper's Table 1 check."""
    rep = res.measured
    assert rep is not None
    rep["residual_grid"] = "residual.png"
    if job.reference_test and res.p_hat is not None:
        scoring = scoring_preset(job.preset, job.device)
        test = ref if ref.has_test else ds
        say(f"Table 1 check: training a classifier (scoring preset {scoring}) on clean + p_hat, scored on the "
            f"clean test images of {'CLEAN' if ref.has_test else 'the input'} ...")
        with timer("reference_test"):
            rep["table1"] = {"scoring_preset": scoring, "test_split_of": "reference" if ref.has_test else "input",
                             **table1_check(ref.x_train, ds.y_train, res.p_hat, ds.x_train, test.x_test, test.y_test,
                                            TrainConfig.preset(scoring), job.seed, job.device,
                                            progress=not job.quiet, classes=ds.classes)}
    rep["headline"] = headline(rep)


# --- writing ---------------------------------------------------------------------------------------------------
def write_purify_outputs(job: PurifyJob, ds: ImageDataset, res: PurifyResult, rdir: Path, timer: Timer) -> None:
    """OUT (atomically, in its format), and beside it the report: arrays, grid, manifest, report.md."""
    x_out = res.images
    with timer("write"):
        save_dataset(res.dataset, job.output, job.format, overwrite=job.overwrite)
    for k, arr in res.extras.items():
        own = res.extra_files.get(k)  # a streamed array: its file is moved, not copied
        if own is not None and Path(own).is_file():
            move_file_atomic(own, rdir / f"{k}.npy")
        else:
            save_npy_atomic(rdir / f"{k}.npy", arr)
    g = GRID
    rows = {"input": ds.x_train[:g], **{k: v[:g] for k, v in res.stages.items()}, "output": x_out[:g],
            "residual (amplified)": residual_image(ds.x_train[:g], x_out[:g])}
    save_image_grid(rows, rdir / "grid.png", title=f"{job.method}: PSNR {res.psnr_input_output:.2f} dB")
    cfg = {"method": job.method, "params": res.params, "input": job.input, "output": job.output,
           "format": job.format or ds.format, "memory_budget": job.memory_budget,
           "processes": res.info.get("distributed", {}).get("world_size", 1), "reference": job.reference,
           "reference_test": job.reference_test}
    write_json(rdir / "manifest.json", manifest("purify", cfg, job.seed, timer.times, stats=res.stats(),
                                                 n_train=int(len(ds.x_train)), reference=res.measured))
    _write_report_md(rdir, job, res, timer.times)
    res.close()


def _write_report_md(rdir: Path, job: PurifyJob, res: PurifyResult, times: dict[str, float]) -> None:
    """``report.md``: what ran, PSNR per stage, timings and, with --reference, the measurements."""
    lines = [f"# unpoison purify --method {job.method}", "",
             f"- input: `{printable(job.input)}`", f"- output: `{printable(job.output)}`",
             f"- PSNR(input, output): {res.psnr_input_output:.2f} dB"]
    for k, v in (res.info.get("psnr_db") or {}).items():
        lines.append(f"- PSNR {k}: {v:.2f} dB")
    lines.append("- time: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()))
    lines += ["", "![input, stages, output](grid.png)", ""]
    measured = res.measured
    if measured is None:
        lines += ["No --reference given: how much poison each stage removed is not measured (give the clean "
                  "images with --reference CLEAN).", ""]
    else:
        lines += [f"## Against the clean images (`{printable(job.reference)}`)", "", report_markdown(measured),
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


def summary_lines(res: PurifyResult, job: PurifyJob) -> list[str]:
    """What the command prints at the end (the measurements first, when there are any)."""
    out = []
    if res.measured is not None:
        rep = res.measured
        h = rep.get("headline") or headline(rep)
        fmt = _fmt
        pz = rep["poisoned"]
        out.append(f"reference: {pz['n']} of {pz['of']} images poisoned; PSNR to clean: " + ", ".join(
            f"{k} {fmt(v['psnr_to_clean'], '{:.2f}')} dB" for k, v in rep["all"]["stages"].items()))
        if "stage1_corr" in h:
            out.append(f"stage 1: corr(p_hat, p) {fmt(h['stage1_corr'])} (quartiles {fmt(h['stage1_corr_q25'])} / "
                       f"{fmt(h['stage1_corr_median'])} / {fmt(h['stage1_corr_q75'])}), poison energy removed "
                       f"{fmt(h['stage1_energy_removed'], '{:.1%}')}, class-mean corr {fmt(h['stage1_class_corr'])}")
        out.append(f"poison left in the output: {fmt(h.get('poison_left'))} of p (1 = all of it, 0 = none)")
        t1 = rep.get("table1")
        if t1:
            out.append(f"Table 1 (trained on clean + p_hat): clean train {t1['acc_clean_train']:.2f}%, clean test "
                       f"{t1['acc_clean_test']:.2f}%, poisoned {t1['acc_poisoned_train']:.2f}%")
    out.append(f"purified {len(res.images)} images with {job.method}: PSNR(input, output) = "
               f"{res.psnr_input_output:.2f} dB; wrote {job.output} and {report_dir(job.output)}/")
    return out


def _fmt(v: float | None, spec: str = "{:.3f}") -> str:
    return "n/a" if v is None else spec.format(v)


def purify_in_processes(ds: ImageDataset, method: str, params: dict[str, Any], nproc: int, workdir: str | Path,
                        seed: int = 0, device: str = "auto") -> PurifyResult:
    """Purify ``ds`` with ``nproc`` data-parallel ranks on this machine (how a benchmark cell given several GPUs
    trains on all of them): each rank runs :func:`purify_dataset` (:func:`run_purify_job`), in a child
    process that launches them. The data goes to an ``npy`` folder in ``workdir`` and the purified images come
    back memory-mapped. Resumable: run again, it continues from the checkpoints in ``workdir``."""
    work = Path(workdir)
    src, out = work / "in", work / "out"
    save_dataset(ImageDataset(np.asarray(ds.x_train), np.asarray(ds.y_train)), src, "npy", overwrite=True)
    job = PurifyJob(str(src), str(out), method, dict(params), seed=seed, device=str(device), quiet=True, resume=True,
                    overwrite=True)
    spec = work / "job.json"
    spec.write_text(json.dumps(job.to_dict()))
    r = subprocess.run([sys.executable, "-m", "unpoison.pipeline.worker", "--nproc", str(nproc), str(spec)],
                       capture_output=True, text=True)
    if r.returncode:
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        raise RuntimeError(f"purify with {nproc} processes failed (exit {r.returncode}): {lines[-1] if lines else ''}")
    rdir = work / "out.report"
    stats = json.loads((rdir / "manifest.json").read_text())["stats"]
    p_file = rdir / "p_hat.npy"  # the run's report keeps stage 1's p_hat
    extras = {"p_hat": np.load(p_file)} if p_file.is_file() else {}
    x = load_dataset(out, mmap=True).x_train
    return PurifyResult(ds.replace(x_train=np.array(x)), method, dict(params), {}, extras, {},
                        stats, stats["psnr_input_output"])


def worker_main(argv: list[str] | None = None) -> int:
    """A worker rank (``python -m unpoison.pipeline.worker JOB.json``), or with ``--nproc N`` the launcher of N."""
    p = argparse.ArgumentParser(prog="unpoison-purify-worker")
    p.add_argument("job")
    p.add_argument("--nproc", type=int, default=None)
    a = p.parse_args(argv)
    job = PurifyJob(**json.loads(Path(a.job).read_text()))

    def go() -> int:
        if a.nproc is not None:
            return launch_purify_job(job, a.nproc)
        res = run_purify_job(job)
        if res is not None:
            print("\n".join(summary_lines(res, job)), flush=True)
        return 0

    return run_guarded("unpoison purify", go)

