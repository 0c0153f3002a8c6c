"""Run one benchmark cell: load data -> attack (cached) -> purify or train-time defense -> evaluate.

Every cell writes ``OUTDIR/cells/<id>/manifest.json`` (and an image grid for purifying cells) and
returns a record ``{status, results, manifest, timings, error, data_digest}`` that the driver puts in
the store. Poisoned training sets are cached in ``OUTDIR/cache/attacks`` keyed by content: the dataset's
digest (a streamed hash of its images and labels), the subset, the attack's name, bound, parameters,
preset, ratio and seed, and the attack's code version; written atomically and computed once even with
parallel workers (a file lock), so a table's defenses all see the same poison, a rerun never recomputes
it, and changed data or attack code never reuses it. Purifiers that checkpoint get
``OUTDIR/cells/<id>/ckpt`` with ``resume=True``: a killed cell continues where it stopped.

``kind`` selects the experiment (:data:`KINDS`): ``purify`` (Tables 2, 5, 6, 13, Fig. 2/6, attack
efficacy), ``disentangle-check`` (Table 1 and how much poison each stage removed), ``detect`` (Table 7),
``partial`` (Table 8), ``amplify`` (Sec. 5.2), ``theorem2`` (the numerical check of Theorem 2), and
``train-diffusion`` (a dependency: AVATAR's DDPM).

A cell poisons clean data itself, so the clean images are always known: every purifying cell measures
each stage against them (:func:`unpoison.disentangle.purification_report`: stage 1's corr(p_hat, p) and
poison energy removed, the poison left and the PSNR to the clean images after each stage, on the
poisoned images alone under partial poisoning) and writes ``residual.png`` (p, p_hat, p - p_hat).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._registry import Registry
from ..data import ImageDataset, load_dataset
from ..data.fingerprint import dataset_fingerprint
from ..disentangle import add_perturbation
from ..errors import UserError
from ..outputs import atomic_path
from ..params import Param
from ..utils import Timer, manifest, parse_fraction, psnr, write_json
from .grid import Cell, attack_seed, import_plugins, short_hash
from .report import (
    SectionFn,
    amplify_section,
    detect_section,
    diffusion_section,
    disentangle_section,
    partial_section,
    purify_section,
    theorem2_section,
)
from .report_scan import scan_section

KindFn = Callable[["CellContext"], dict[str, Any]]
#: file name of the DDPM a ``train-diffusion`` cell leaves in its folder


@dataclass(frozen=True)
class Kind:
    """An experiment function plus what its cells may hold, for the check before a grid starts.

    ``params``: the ``params:`` keys it reads (:class:`~unpoison.params.Param`). ``defense``: what its defense axis
    may name: ``any`` (none, a purifier or a training-time defense), ``purifier`` (none or a purifier),
    ``stage1`` (a purifier exposing a stage-1 ``p_hat``; none means dvae), ``apply`` (like stage1, and
    able to infer ``p_hat`` on new images), ``none``. The rest is what the check before a grid does with
    its cells, declared here rather than known by name in :mod:`unpoison.bench.check`: ``checks`` (the steps,
    by name: params, train, attack, defense, diffusion), ``data`` (whether a cell loads a dataset),
    ``detector`` (its ``params`` name a purifier that flags samples), ``builds_defense`` (whether the defense
    entry is built as a purifier), ``ratio`` (the poison ratio when a cell names none), ``report`` (the
    section of :func:`unpoison.bench.report.build_report` that lays its cells out; none: no section).
    """

    name: str
    fn: KindFn
    help: str
    params: dict[str, Param] = field(default_factory=dict)
    defense: str = "any"
    checks: tuple[str, ...] = ("params", "train", "attack", "defense")
    data: bool = True
    detector: bool = False
    builds_defense: bool = True
    ratio: float = 1.0
    report: SectionFn | None = None


#: experiment functions, selected by a cell's ``kind``
KINDS: Registry[Kind] = Registry("cell kind")


def kind(name: str, help: str, params: dict[str, Param] | None = None, defense: str = "any",  # noqa: A002
         **declared: Any) -> Callable[[KindFn], KindFn]:
    """Register an experiment function as cell kind ``name`` (``declared``: the rest of :class:`Kind`)."""

    def deco(fn: KindFn) -> KindFn:
        KINDS.register(name, help)(Kind(name, fn, help, dict(params or {}), defense, **declared))
        return fn

    return deco


# --- data, keyed by content -----------------------------------------------------------------------------
def dataset_digest(ds: ImageDataset) -> str:
    """What caches and finished cells are keyed by: the content of both splits (streamed, so a memory-mapped
    dataset is never read whole), never the spec or path (:func:`unpoison.data.fingerprint.dataset_fingerprint`)."""
    return dataset_fingerprint(ds)


@functools.lru_cache(maxsize=4)
def load_for_cell(spec: str, n_train: int | None, n_test: int | None, seed: int) -> tuple[ImageDataset, str]:
    """The (subset of the) dataset a cell uses and the content digest of the whole dataset (cached per process;
    callers get the cached object, so they must not change its arrays: see :meth:`CellContext.data`)."""
    ds = load_dataset(spec)
    digest = dataset_digest(ds)
    if n_train is not None or n_test is not None:
        ds = ds.subset(n_train, n_test, seed)
    return ds, digest


def subset_args(c: dict[str, Any]) -> tuple[str, int | None, int | None, int]:
    sub = c.get("subset") or {}
    return str(c["dataset"]), sub.get("n_train"), sub.get("n_test"), int(sub.get("seed", 0))


class CellContext:
    """What an experiment function gets: the cell's config, folders, device, timer, progress flag."""

    def __init__(self, cell: Cell, outdir: Path, progress: bool) -> None:
        self.cell = cell
        self.c = cell.config
        self.outdir = outdir
        self.dir = outdir / "cells" / cell.id
        self.progress = progress
        self.timer = Timer()
        self.seed = int(self.c.get("seed", 0))
        self.device = self.c.get("device", "auto")
        self.digest = cell.data
        self.extra: dict[str, Any] = {}

    # --- data ---------------------------------------------------------------------------------
    def data(self) -> ImageDataset:
        """The cell's data: a private copy (the loaded dataset is cached and shared by the cells of a process)."""
        with self.timer("load"):
            ds, digest = load_for_cell(*subset_args(self.c))
        if self.cell.data and digest != self.cell.data:
            raise UserError(f"dataset {self.c['dataset']!r} changed since the grid was checked (content digest "
                            f"{digest[:12]} != {self.cell.data[:12]}); rerun to recompute")
        self.digest = digest

        def own(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else np.array(a, copy=True)

        return dataclasses.replace(ds, x_train=own(ds.x_train), y_train=own(ds.y_train), x_test=own(ds.x_test),
                                   y_test=own(ds.y_test), classes=list(ds.classes), attrs=dict(ds.attrs))

    # --- attack (cached) ----------------------------------------------------------------------
    def poison(self, ds: ImageDataset, ratio: float | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Poisoned copy of the training split, poisoned indices, attack info (from the content-keyed cache)."""
        from ..attacks import ATTACKS

        a = self.c["attack"]
        x = ds.x_train
        ratio = float(ratio if ratio is not None else a.get("ratio", self.c.get("ratio", 1.0)))
        if a["name"] == "none":
            return x, np.zeros(0, dtype=np.int64), {"attack": "none"}
        eps = None if a.get("eps") is None else parse_fraction(a["eps"], "eps")
        seed = attack_seed(self.c)
        kw: dict[str, Any] = dict(a["params"])
        if self.c.get("attack_preset"):
            kw.setdefault("preset", self.c["attack_preset"])
        key = short_hash({"data": self.digest, "subset": self.c.get("subset"), "n": len(x), "attack": a["name"],
                          "eps": eps, "params": kw, "ratio": ratio, "seed": seed,
                          "code": ATTACKS.get(a["name"]).code_version()}, 16)
        cache = self.outdir / "cache" / "attacks"
        path = cache / f"{a['name']}-{key}.npz"
        with self.timer("attack"), _file_lock(cache / f"{a['name']}-{key}.lock"):
            if path.exists():
                with np.load(path, allow_pickle=False) as z:
                    if z["x"].shape == x.shape:
                        self.extra.setdefault("attack_cache", []).append({"path": str(path), "hit": True})
                        return z["x"], z["indices"], json.loads(str(z["info"]))
            from ..pipeline import poison_dataset

            checkpoints = ATTACKS.get(a["name"]).supports_checkpoint
            res = poison_dataset(ds, a["name"], {k: v for k, v in kw.items() if k != "preset"}, eps=eps,
                                 ratio=ratio, seed=seed, device=self.device, progress=self.progress,
                                 preset=kw.get("preset", "paper"), checkpoint_dir=cache / f"{a['name']}-{key}.ckpt",
                                 resume=checkpoints)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, x=res.x, indices=res.indices, info=np.array(json.dumps(res.info, default=str)))
            self.extra.setdefault("attack_cache", []).append({"path": str(path), "hit": False})
            return res.x, res.indices, res.info

    # --- defenses -----------------------------------------------------------------------------
    def purifier(self, name: str | None = None, params: dict[str, Any] | None = None, sub: str = "purifier") -> Any:
        """A configured purifier with the cell's device/seed/progress and a resumable checkpoint folder."""
        from ..defenses import DEFENSES, make_purifier

        d = self.c["defense"]
        name = name or d["name"]
        kw = dict(d["params"] if params is None else params)
        cls = DEFENSES.get(name)
        dep = cls.DEPENDENCY
        if dep is not None and not kw.get(dep.param) and self.c.get(dep.cell_key):
            kw[dep.param] = str(self.outdir / "cells" / self.c[dep.cell_key] / dep.file)
        ckpt = str(self.dir / "ckpt" / sub) if cls.supports_checkpoint else None
        return make_purifier(name, device=self.device, seed=self.seed, progress=self.progress,
                             checkpoint_dir=ckpt, resume=ckpt is not None, **kw)

    def purify(self, ds: ImageDataset, x_p: np.ndarray, idx: np.ndarray, name: str | None = None,
               params: dict[str, Any] | None = None) -> Any:
        """:func:`unpoison.pipeline.purify_dataset` of the poisoned split ``x_p`` (``idx``: its poisoned rows),
        measured against the clean images with the residual grid; data-parallel when the cell's ``resources``
        give it several GPUs (``num_gpus``) or processes (``nproc``)."""
        from ..defenses import DEFENSES
        from ..pipeline import measure_against_clean, purify_dataset, purify_in_processes

        d = self.c["defense"]
        name = name or d["name"]
        title = f"{self.c['attack']['label']} / {d['label']}: p, p_hat, p - p_hat"
        res = self.c.get("resources") or {}
        nproc = int(res.get("nproc") or res.get("num_gpus") or 1)
        poisoned = ds.replace(x_train=x_p)
        if nproc > 1 and DEFENSES.get(name).supports_streaming:  # several GPUs: one data-parallel rank each
            with self.timer("purify"):
                out = purify_in_processes(poisoned, name, d["params"] if params is None else params, nproc,
                                          self.dir / "nproc", self.seed, str(self.device))
            with self.timer("measure"):
                out.measured = measure_against_clean(ds.x_train, x_p, out.images, {}, out.p_hat, ds.y_train, idx,
                                                     self.dir / "residual.png", title)
            return out
        return purify_dataset(poisoned, name, purifier=self.purifier(name, params), clean=ds, poisoned_idx=idx,
                              residual_grid=self.dir / "residual.png", grid_title=title, timer=self.timer)

    def train_config(self, **changes: Any) -> Any:
        """The cell's scoring config: ``train:`` with the defense entry's ``train:`` on top, then ``changes``."""
        from ..train import TrainConfig

        t = {**(self.c.get("train") or {}), **(self.c["defense"].get("train") or {})}
        preset = t.pop("preset", "smoke")
        t["model"] = self.c.get("model") or t.get("model")
        return dataclasses.replace(TrainConfig.preset(preset, **t), **changes)

    def train(self, train: ImageDataset, test: ImageDataset | None = None, train_defense: Any = None,
              desc: str = "train", config: Any = None) -> Any:
        from ..train import train_classifier

        with self.timer("train"):
            return train_classifier(train, test, config or self.train_config(), self.seed, self.device,
                                    train_defense, progress=self.progress, desc=desc)

    def save_grid(self, rows: dict[str, np.ndarray], title: str) -> None:
        from ..viz import save_image_grid

        rows = {k: v for k, v in rows.items() if v is not None and len(v)}
        if rows:
            save_image_grid(rows, self.dir / "grid.png", title=title)


# --- helpers -------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- experiment kinds --------------------------------------------------------------------------------------
@kind("purify", "attack -> pre-training purifier or training-time defense -> clean test accuracy",
      params={"no_aug_column": Param(bool, False, "also score without crop + flip (what the augmentation defeats)")},
      report=purify_section)
def kind_purify(ctx: CellContext) -> dict[str, Any]:
    ds = ctx.data()
    x_p, idx, ainfo = ctx.poison(ds)
    d = ctx.c["defense"]
    out: dict[str, Any] = {"attack_info": ainfo, "n_poisoned": int(len(idx)), "psnr_attack": psnr(ds.x_train, x_p)}
    if "timings_s" in ainfo:
        out["craft_s"] = ainfo["timings_s"].get("craft")  # from the cache's record: the time it took to make
    x_train, train_defense = x_p, None
    from ..defenses import DEFENSES

    if d["name"] != "none" and d["name"] in DEFENSES:
        from ..disentangle import headline
        from ..viz import residual_image

        r = ctx.purify(ds, x_p, idx)
        x_train = r.images
        out["defense_info"] = r.info
        out["psnr"] = r.psnr_input_output
        out["psnr_clean"] = psnr(ds.x_train, x_train)
        ctx.save_grid({"clean": ds.x_train, "poisoned": x_p, **r.stages, "purified": x_train,
                       "residual": residual_image(x_p, x_train)},
                      f"{ctx.c['attack']['label']} / {d['label']}: PSNR {out['psnr']:.2f} dB")
        out.update({"disentangle": r.measured, **headline(r.measured)})
    elif d["name"] != "none":
        from ..defenses import make_train_defense

        train_defense = make_train_defense(d["name"], **d["params"])
    elif len(idx):
        from ..viz import residual_image

        ctx.save_grid({"clean": ds.x_train, "poisoned": x_p, "residual": residual_image(x_p, ds.x_train)},
                      f"{ctx.c['attack']['label']}: PSNR {out['psnr_attack']:.2f} dB")
    res = ctx.train(ds.replace(x_train=x_train), train_defense=train_defense, desc=ctx.cell.key[-40:])
    out.update(final_acc=res.final_acc, best_acc=res.best_acc, best_epoch=res.best_epoch,
               per_class_acc=res.per_class_acc, images_per_s=res.images_per_s)
    if (ctx.c.get("params") or {}).get("no_aug_column"):
        plain = ctx.train_config(crop_pad=0, flip=False)
        if train_defense is not None:
            from ..defenses import make_train_defense

            train_defense = make_train_defense(d["name"], **d["params"])  # a fresh one: defenses keep state
        out["acc_no_aug"] = ctx.train(ds.replace(x_train=x_train), train_defense=train_defense, config=plain,
                                      desc="no crop/flip").final_acc
    return out


def _p_hat(ctx: CellContext, x: np.ndarray, y: np.ndarray, x_apply: np.ndarray | None = None,
           y_apply: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    from ..detect import stage1_p_hat

    d = ctx.c["defense"]
    name = d["name"] if d["name"] != "none" else "dvae"
    with ctx.timer("stage1"):
        return stage1_p_hat(x, y, purifier=name, params=d["params"], x_apply=x_apply, y_apply=y_apply,
                            device=ctx.device, seed=ctx.seed, progress=ctx.progress,
                            checkpoint_dir=str(ctx.dir / "ckpt" / "stage1"))


@kind("disentangle-check", "Table 1 + per stage: how much poison each stage removed (corr(p_hat, p), energy "
      "removed, poison left, PSNR to clean); clean + p_hat still poisons (acc on clean train/test, poisoned)",
      defense="stage1", report=disentangle_section)
def kind_disentangle_check(ctx: CellContext) -> dict[str, Any]:
    """Purify (both stages), measure every stage against the clean images, then the paper's Table 1 check: a
    classifier trained on clean + p_hat, scored on the clean training images T, the clean test images D and the
    poisoned images P (defense ``none`` means dvae)."""
    from ..disentangle import headline, table1_check
    from ..viz import residual_image

    ds = ctx.data()
    x_p, idx, ainfo = ctx.poison(ds)
    d = ctx.c["defense"]
    name = d["name"] if d["name"] != "none" else "dvae"
    r = ctx.purify(ds, x_p, idx, name, d["params"] if d["name"] != "none" else {})
    x_out, p_hat = r.images, r.p_hat
    if p_hat is None:
        raise UserError(f"defense {name!r} exposes no stage-1 p_hat; the disentangle check needs one (e.g. dvae)")
    out: dict[str, Any] = {"attack_info": ainfo, "defense_info": r.info, "n_poisoned": int(len(idx)),
                           "psnr": r.psnr_input_output, "psnr_clean": psnr(ds.x_train, x_out),
                           "disentangle": r.measured, **headline(r.measured)}
    with ctx.timer("train"):
        t1 = table1_check(ds.x_train, ds.y_train, p_hat, x_p, ds.x_test, ds.y_test, ctx.train_config(), ctx.seed,
                          ctx.device, ctx.progress, ds.classes)
    out.update(t1, final_acc=t1["acc_clean_test"])
    x_hat = add_perturbation(ds.x_train, p_hat)
    corr = out.get("stage1_corr")
    ctx.save_grid({"clean": ds.x_train, "poisoned": x_p, "clean + p_hat": x_hat,
                   "p_hat": residual_image(x_hat, ds.x_train), **r.stages, "purified": x_out},
                  f"{ctx.c['attack']['label']}: disentangled p_hat, corr(p_hat, p) "
                  f"{'n/a' if corr is None else f'{corr:.2f}'}")
    return out


def detection_metrics(flags: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Accuracy, recall, precision, F1 of boolean ``flags`` against boolean ``truth`` (poisoned = True)."""
    tp = float(np.sum(flags & truth))
    fp = float(np.sum(flags & ~truth))
    fn = float(np.sum(~flags & truth))
    acc = float(np.mean(flags == truth)) if len(truth) else float("nan")
    rec = tp / (tp + fn) if tp + fn else float("nan")
    prec = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * prec * rec / (prec + rec) if prec == prec and rec == rec and prec + rec else float("nan")
    return {"det_acc": acc, "recall": rec, "precision": prec, "f1": f1}


def _detect(ctx: CellContext, ds: ImageDataset, x_p: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    from ..detect import detect_poison

    p = ctx.c.get("params") or {}
    d = ctx.c["defense"]
    with ctx.timer("detect"):
        res = detect_poison(x_p, ds.y_train, purifier=p.get("detector", "dvae"),
                            params=p.get("detector_params", d["params"] if d["name"] == "dvae" else {}),
                            train_config=ctx.train_config(), seed=ctx.seed, device=ctx.device,
                            progress=ctx.progress, checkpoint_dir=str(ctx.dir / "ckpt" / "detect"))
    return res.flags, res.info


_DETECT_PARAMS: dict[str, Param] = {
    "detector": Param(str, "dvae", "purifier whose stage-1 p_hat flags samples"),
    "detector_params": Param(dict, None, "its parameters (default: the defense entry's when it is dvae)"),
}


@kind("detect", "Table 7: flag poisoned samples from D-VAE's stage-1 p_hat (acc, recall, precision, F1)",
      params=_DETECT_PARAMS, defense="stage1", detector=True, builds_defense=False, report=detect_section)
def kind_detect(ctx: CellContext) -> dict[str, Any]:
    ds = ctx.data()
    x_p, idx, ainfo = ctx.poison(ds, ratio=float(ctx.c.get("ratio", 1.0)))
    flags, info = _detect(ctx, ds, x_p)
    truth = np.zeros(len(x_p), dtype=bool)
    truth[idx] = True
    return {"attack_info": ainfo, "detect_info": info, "n_flagged": int(flags.sum()), "n_poisoned": int(len(idx)),
            **detection_metrics(flags, truth)}


@kind("scan", "is this dataset poisoned? the scan's verdict, score and kind, and its per-sample detection "
      "(recall, precision, F1) against the poisoned indices", defense="none",
      params={"signals": Param(list, None, "the scan's signals (default: unpoison.scan.DEFAULT_SIGNALS)"),
              "threshold": Param(float, None, "the verdict's |z| threshold (default: the scan's)", low=0,
                                 low_open=True)}, report=scan_section)
def kind_scan(ctx: CellContext) -> dict[str, Any]:
    from ..scan import ScanConfig, scan
    from ..viz import save_scan_evidence

    ds = ctx.data()
    ratio = float(ctx.c.get("ratio", 1.0)) if ctx.c["attack"]["name"] != "none" else None
    x_p, idx, ainfo = ctx.poison(ds, ratio=ratio)
    p = ctx.c.get("params") or {}
    cfg = ScanConfig()
    if p.get("signals"):
        cfg.signals = tuple(p["signals"])
    if p.get("threshold") is not None:
        cfg.threshold = float(p["threshold"])
    with ctx.timer("scan"):
        res = scan(x_p, ds.y_train, cfg, seed=ctx.seed, device=ctx.device, progress=ctx.progress)
    truth = np.zeros(len(x_p), dtype=bool)
    truth[idx] = True
    save_scan_evidence(res, truth, ctx.dir / "evidence.png", ctx.c["attack"]["label"])
    out = {"attack_info": ainfo, "n_poisoned": int(len(idx)), "n": int(len(x_p)), **res.summary(),
           "z": {s: e.get("z") for s, e in res.evidence.items()}}
    if len(idx):
        out.update(detection_metrics(res.flags, truth))
        out["psnr_attack"] = psnr(ds.x_train, x_p)
    return out


@kind("partial", "Table 8: poison a fraction; detect, then purify only the flagged part (or all)",
      params={**_DETECT_PARAMS, "detect_first_for": Param(list, ["dvae"], "defenses that purify only flagged images")},
      defense="purifier", detector=True, report=partial_section)
def kind_partial(ctx: CellContext) -> dict[str, Any]:
    ds = ctx.data()
    x_p, idx, ainfo = ctx.poison(ds, ratio=float(ctx.c.get("ratio", 1.0)))
    d = ctx.c["defense"]
    detect_first = d["name"] in ((ctx.c.get("params") or {}).get("detect_first_for", ["dvae"]))
    out: dict[str, Any] = {"attack_info": ainfo, "detect_first": detect_first}
    x_train = x_p.copy()
    if d["name"] != "none":
        sel = np.arange(len(x_p))
        if detect_first:
            flags, info = _detect(ctx, ds, x_p)
            truth = np.zeros(len(x_p), dtype=bool)
            truth[idx] = True
            out.update(detect_info=info, **detection_metrics(flags, truth))
            sel = np.flatnonzero(flags)
        if len(sel):
            pur = ctx.purifier()
            # a learning purifier needs >= 2 classes; when the flagged part has one, fit on everything
            fit_idx = sel if len(np.unique(ds.y_train[sel])) > 1 else np.arange(len(x_p))
            out["purifier_fit_on"] = int(len(fit_idx))
            with ctx.timer("purify"):
                pur.fit(x_p[fit_idx], ds.y_train[fit_idx])
                x_train[sel] = pur.purify(x_p[sel], ds.y_train[sel])
            out["defense_info"] = pur.info_
        out["n_purified"] = int(len(sel))
        out["psnr"] = psnr(x_p, x_train)
    from ..disentangle import headline, purification_report

    with ctx.timer("measure"):  # the whole set against the clean images: poison left, PSNR, poisoned part alone
        rep = purification_report(ds.x_train, x_p, x_train, y=ds.y_train, subset=idx)
    out.update({"disentangle": rep, **headline(rep)})
    res = ctx.train(ds.replace(x_train=x_train))
    out.update(final_acc=res.final_acc, best_acc=res.best_acc, per_class_acc=res.per_class_acc)
    return out


@kind("amplify", "Sec. 5.2: D-VAE fit on a small poisoned part adds p_hat to the clean rest", defense="apply",
      ratio=0.01, report=amplify_section)
def kind_amplify(ctx: CellContext) -> dict[str, Any]:
    ds = ctx.data()
    ratio = float(ctx.c.get("ratio", KINDS.get("amplify").ratio))
    x_p, idx, ainfo = ctx.poison(ds, ratio=ratio)
    rest = np.setdiff1d(np.arange(len(x_p)), idx)
    _, info = None, {}
    p_rest, info = _p_hat(ctx, x_p[idx], ds.y_train[idx], x_apply=ds.x_train[rest], y_apply=ds.y_train[rest])
    x_new = x_p.copy()
    x_new[rest] = add_perturbation(ds.x_train[rest], p_rest)
    res = ctx.train(ds.replace(x_train=x_new), desc="train on amplified poison")
    base = ctx.train(ds.replace(x_train=x_p), desc="train on the small poison only")
    return {"attack_info": ainfo, "stage1_info": info, "final_acc": res.final_acc, "best_acc": res.best_acc,
            "acc_small_poison_only": base.final_acc, "n_poisoned": int(len(idx)), "psnr": psnr(ds.x_train, x_new)}


@kind("theorem2", "Theorem 2: KLD of a normalised two-Gaussian mixture vs its bounds (numerical)",
      params={"r": Param(list, None, "ratios r = delta/sigma to integrate at (default: a log-spaced range)")},
      defense="none", data=False, checks=("params",), report=theorem2_section)
def kind_theorem2(ctx: CellContext) -> dict[str, Any]:
    from .theorem2 import check_theorem2

    p = ctx.c.get("params") or {}
    with ctx.timer("integrate"):
        return check_theorem2(p.get("r", None))


@kind("train-diffusion", "a dependency: the DDPM that this dataset's AVATAR cells denoise with", defense="none",
      checks=("params", "diffusion"), report=diffusion_section)
def kind_train_diffusion(ctx: CellContext) -> dict[str, Any]:
    from ..defenses.avatar import DIFFUSION_FILE, save_checkpoint, train_diffusion

    ds = ctx.data()
    d = dict(ctx.c.get("diffusion") or {})
    with ctx.timer("train"):
        model, cfg, rec = train_diffusion(ds, d.get("preset", "auto"), d.get("epochs"), d.get("batch_size"),
                                          d.get("lr"), ctx.seed, ctx.device, progress=ctx.progress,
                                          flip=bool(d.get("flip", True)))
    save_checkpoint(ctx.dir / DIFFUSION_FILE, cfg, model)
    return {"diffusion_config": cfg, "final_loss": rec["history"][-1]["loss"], "parameters": rec["parameters"],
            "n_train": rec["n_train"], "checkpoint": str(ctx.dir / DIFFUSION_FILE)}


# --- the worker entry point --------------------------------------------------------------------------------
def run_cell(cell: Cell | dict[str, Any], outdir: str | Path, progress: bool = False,
             threads: int | None = None) -> dict[str, Any]:
    """Run one cell and return its record; never raises for a failing cell (the grid goes on)."""
    if isinstance(cell, dict):
        cell = Cell(**cell)
    outdir = Path(outdir)
    t0 = time.time()
    if threads:
        import torch

        torch.set_num_threads(max(1, int(threads)))
    ctx: CellContext | None = None
    try:
        import_plugins(cell.config.get("plugins") or [])
        ctx = CellContext(cell, outdir, progress)
        ctx.dir.mkdir(parents=True, exist_ok=True)
        results = KINDS.get(cell.config["kind"]).fn(ctx)
        rec = {"status": "done", "results": results, "timings": ctx.timer.times, "error": None}
    except Exception as e:  # noqa: BLE001 - a failing cell is recorded, the grid goes on
        rec = {"status": "failed", "results": {}, "timings": ctx.timer.times if ctx else {},
               "error": f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}"}
    rec["timings"] = {**rec["timings"], "total": time.time() - t0}
    rec["data_digest"] = ctx.digest if ctx and ctx.digest else cell.data
    rec["manifest"] = manifest("bench-cell", {"key": cell.key, **cell.config}, int(cell.config.get("seed", 0)),
                               rec["timings"], status=rec["status"], cell_id=cell.id, pid=os.getpid(),
                               data_digest=rec["data_digest"], **({"cache": ctx.extra} if ctx else {}))
    rec["manifest"].pop("argv", None)
    with contextlib.suppress(OSError):
        write_json(outdir / "cells" / cell.id / "manifest.json",
                   {**rec["manifest"], "results": rec["results"], "error": rec["error"]})
    return rec
