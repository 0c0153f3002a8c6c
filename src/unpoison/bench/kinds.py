"""The cell kinds: what one benchmark cell does, selected by its ``kind`` (:data:`KINDS`), and what the check
before a grid and the report know about each (:class:`Kind`).

``purify`` (Tables 2, 5, 6, 13, Fig. 2/6, attack efficacy), ``disentangle-check`` (Table 1 and how much poison
each stage removed), ``detect`` (Table 7), ``scan`` (is this set poisoned?), ``partial`` (Table 8), ``amplify``
(Sec. 5.2), ``theorem2`` (the numerical check of Theorem 2) and ``train-diffusion`` (a dependency: AVATAR's
DDPM). Each kind names its report section; the report lays the sections out in the order the kinds are defined.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._registry import Registry
from ..data import ImageDataset
from ..defenses import DEFENSES, make_train_defense
from ..defenses.avatar import DIFFUSION_FILE, save_checkpoint, train_diffusion
from ..detect import detect_poison, stage1_p_hat
from ..disentangle import add_perturbation, headline, purification_report, table1_check
from ..errors import UserError
from ..params import Param
from ..scan import ScanConfig, scan
from ..utils import psnr
from ..viz import residual_image, save_scan_evidence
from .cell import CellContext
from .report_scan import scan_section
from .sections import (
    SectionFn,
    amplify_section,
    detect_section,
    diffusion_section,
    disentangle_section,
    partial_section,
    purify_section,
    theorem2_section,
)
from .theorem2 import check_theorem2

KindFn = Callable[[CellContext], dict[str, Any]]


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
    if d["name"] != "none" and d["name"] in DEFENSES:
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
        train_defense = make_train_defense(d["name"], **d["params"])
    elif len(idx):
        ctx.save_grid({"clean": ds.x_train, "poisoned": x_p, "residual": residual_image(x_p, ds.x_train)},
                      f"{ctx.c['attack']['label']}: PSNR {out['psnr_attack']:.2f} dB")
    res = ctx.train(ds.replace(x_train=x_train), train_defense=train_defense, desc=ctx.cell.key[-40:])
    out.update(final_acc=res.final_acc, best_acc=res.best_acc, best_epoch=res.best_epoch,
               per_class_acc=res.per_class_acc, images_per_s=res.images_per_s)
    if (ctx.c.get("params") or {}).get("no_aug_column"):
        plain = ctx.train_config(crop_pad=0, flip=False)
        if train_defense is not None:
            train_defense = make_train_defense(d["name"], **d["params"])  # a fresh one: defenses keep state
        out["acc_no_aug"] = ctx.train(ds.replace(x_train=x_train), train_defense=train_defense, config=plain,
                                      desc="no crop/flip").final_acc
    return out


def _p_hat(ctx: CellContext, x: np.ndarray, y: np.ndarray, x_apply: np.ndarray | None = None,
           y_apply: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
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

    p = ctx.c.get("params") or {}
    with ctx.timer("integrate"):
        return check_theorem2(p.get("r", None))


@kind("train-diffusion", "a dependency: the DDPM that this dataset's AVATAR cells denoise with", defense="none",
      checks=("params", "diffusion"), report=diffusion_section)
def kind_train_diffusion(ctx: CellContext) -> dict[str, Any]:
    ds = ctx.data()
    d = dict(ctx.c.get("diffusion") or {})
    with ctx.timer("train"):
        model, cfg, rec = train_diffusion(ds, d.get("preset", "auto"), d.get("epochs"), d.get("batch_size"),
                                          d.get("lr"), ctx.seed, ctx.device, progress=ctx.progress,
                                          flip=bool(d.get("flip", True)))
    save_checkpoint(ctx.dir / DIFFUSION_FILE, cfg, model)
    return {"diffusion_config": cfg, "final_loss": rec["history"][-1]["loss"], "parameters": rec["parameters"],
            "n_train": rec["n_train"], "checkpoint": str(ctx.dir / DIFFUSION_FILE)}
