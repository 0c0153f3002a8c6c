"""How much poison each purification stage removed, where the clean images are known.

D-VAE's claim (paper Sec. 3.4-4.2) is that stage 1's ``p_hat`` *is* the poison: subtracting it takes
the poison out before stage 2 reconstructs at a higher rate. These functions check that claim on
data whose clean version is known, so the true perturbation is ``p = x0 - x_clean`` *as stored*
(after uint8 rounding and clipping at 0 and 255, which is what the data holds).

Conventions: images are uint8 NHWC; ``p`` and ``p_hat`` are float arrays in grey levels (0..255
pixel units, the purifiers' convention: ``x0 - p_hat`` is directly comparable with uint8 images).
Pure numpy, no I/O apart from :func:`save_residual_grid`, and no training apart from
:func:`table1_check` (the paper's Table 1 check trains a classifier); every result is JSON-able.
The purify command (``--reference CLEAN``) and the benchmark's ``purify`` and ``disentangle-check``
cells all measure through :func:`purification_report`, so the numbers mean the same everywhere.

Metrics (per image unless said otherwise):

- ``corr``: Pearson correlation of ``p_hat`` with ``p`` (each image flattened). Images where either
  is constant (e.g. unpoisoned images under partial poisoning) have no correlation and are left out.
- ``energy_removed``: ``1 - ||p - p_hat||^2 / ||p||^2``. 1 = exact, 0 = nothing removed (``p_hat = 0``),
  negative = subtracting ``p_hat`` adds error. Aggregate: summed norms over the images.
- ``poison_share(r)``: ``<r, p> / <p, p>``, the least-squares share of ``p`` contained in a residual
  ``r`` (e.g. ``x_stage - x_clean``: 1 = all poison still there, 0 = none). Aggregate and per image.
- ``psnr_to_clean``: PSNR (dB) of a stage's output to the clean images (whole batch).
- ``class_corr``: per class, the correlation of the class mean of ``p_hat`` with the class mean of
  ``p`` (does stage 1 find the class-wise component?).
- Table 1 (:func:`table1_check`): a classifier trained on ``clean + p_hat`` is scored on the clean
  training images (T), the clean test images (D) and the poisoned images (P). If ``p_hat`` is the
  poison, D is low and P high.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .data import ImageDataset
from .tensors import to_device_images
from .train import predict, train_classifier
from .utils import psnr_from_mse
from .viz import residual_image, save_image_grid

__all__ = [
    "true_perturbation",
    "per_image_corr",
    "energy_removed",
    "poison_share",
    "class_mean_corr",
    "psnr_to",
    "summary",
    "disentangle_report",
    "report_rows",
    "residual_grid_rows",
    "save_residual_grid",
    "poisoned_indices",
    "reference_problem",
    "purification_report",
    "headline",
    "report_markdown",
    "add_perturbation",
    "table1_check",
]


def _flat(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(len(a), -1)


def true_perturbation(x_clean: np.ndarray, x_poisoned: np.ndarray) -> np.ndarray:
    """``x_poisoned - x_clean`` as float32 grey levels (what the stored data holds, after rounding/clipping)."""
    if np.shape(x_clean) != np.shape(x_poisoned):
        raise ValueError(f"clean images {np.shape(x_clean)} and poisoned images {np.shape(x_poisoned)} differ in shape")
    return np.asarray(x_poisoned, dtype=np.float32) - np.asarray(x_clean, dtype=np.float32)


def per_image_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each image of ``a`` with the same image of ``b``; NaN where either is constant."""
    fa, fb = _flat(a), _flat(b)
    fa = fa - fa.mean(1, keepdims=True)
    fb = fb - fb.mean(1, keepdims=True)
    den = np.sqrt((fa * fa).sum(1) * (fb * fb).sum(1))
    num = (fa * fb).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def energy_removed(p: np.ndarray, p_hat: np.ndarray) -> tuple[float, np.ndarray]:
    """``1 - ||p - p_hat||^2 / ||p||^2``: aggregate over all images, and per image (NaN where ``p = 0``)."""
    fp, fq = _flat(p), _flat(p_hat)
    err = ((fp - fq) ** 2).sum(1)
    en = (fp * fp).sum(1)
    total = en.sum()
    agg = float(1.0 - err.sum() / total) if total > 0 else float("nan")
    with np.errstate(invalid="ignore", divide="ignore"):
        per = np.where(en > 0, 1.0 - err / np.where(en > 0, en, 1.0), np.nan)
    return agg, per


def poison_share(r: np.ndarray, p: np.ndarray) -> tuple[float, np.ndarray]:
    """``<r, p> / <p, p>``: aggregate over all images, and per image (NaN where ``p = 0``)."""
    fr, fp = _flat(r), _flat(p)
    num = (fr * fp).sum(1)
    en = (fp * fp).sum(1)
    total = en.sum()
    agg = float(num.sum() / total) if total > 0 else float("nan")
    with np.errstate(invalid="ignore", divide="ignore"):
        per = np.where(en > 0, num / np.where(en > 0, en, 1.0), np.nan)
    return agg, per


def class_mean_corr(p: np.ndarray, p_hat: np.ndarray, y: np.ndarray) -> dict[int, float]:
    """Per class: correlation of the class mean of ``p_hat`` with the class mean of ``p`` (NaN if constant)."""
    y = np.asarray(y)
    out: dict[int, float] = {}
    for k in np.unique(y):
        m = y == k
        mp = np.asarray(p, dtype=np.float64)[m].mean(0, keepdims=True)
        mq = np.asarray(p_hat, dtype=np.float64)[m].mean(0, keepdims=True)
        out[int(k)] = float(per_image_corr(mp, mq)[0])
    return out


def psnr_to(x_ref: np.ndarray, x: np.ndarray) -> float:
    """PSNR (dB) of uint8 (0..255) images ``x`` to ``x_ref``, over the whole batch (inf if identical)."""
    d = (np.asarray(x, dtype=np.float64) - np.asarray(x_ref, dtype=np.float64)) / 255.0
    return psnr_from_mse(float((d * d).mean()))


def summary(v: np.ndarray) -> dict[str, float]:
    """Mean and quartiles of the finite values of ``v`` (NaN when there are none), and how many there were."""
    v = np.asarray(v, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {"mean": float("nan"), "q25": float("nan"), "median": float("nan"), "q75": float("nan"), "n": 0}
    q25, med, q75 = np.percentile(v, [25, 50, 75])
    return {"mean": float(v.mean()), "q25": float(q25), "median": float(med), "q75": float(q75), "n": int(len(v))}


def _l2_per_image(a: np.ndarray) -> np.ndarray:
    """Per-image l2 norm in [0, 1] pixel units (the attacks' l2 bounds are quoted in these)."""
    return np.sqrt((_flat(a) ** 2).sum(1)) / 255.0


def _block(x_clean: np.ndarray, p: np.ndarray, p_hat: np.ndarray | None, stages: Mapping[str, np.ndarray],
           y: np.ndarray | None) -> dict[str, Any]:
    out: dict[str, Any] = {"n": int(len(p)), "p_l2": summary(_l2_per_image(p))}
    if p_hat is not None:
        agg, per = energy_removed(p, p_hat)
        out["p_hat"] = {
            "corr": summary(per_image_corr(p_hat, p)),
            "energy_removed": agg,
            "energy_removed_per_image": summary(per),
            "share": poison_share(p_hat, p)[0],
            "p_hat_l2": summary(_l2_per_image(p_hat)),
        }
        if y is not None:
            cc = class_mean_corr(p, p_hat, y)
            out["p_hat"]["class_corr"] = {str(k): v for k, v in cc.items()}
    st: dict[str, Any] = {}
    for name, xs in stages.items():
        r = np.asarray(xs, dtype=np.float32) - np.asarray(x_clean, dtype=np.float32)
        share, share_per = poison_share(r, p)
        st[name] = {"psnr_to_clean": psnr_to(x_clean, xs), "poison_left_corr": summary(per_image_corr(r, p)),
                    "poison_left_share": share, "poison_left_share_per_image": summary(share_per)}
    out["stages"] = st
    return out


def disentangle_report(x_clean: np.ndarray, x0: np.ndarray, p_hat: np.ndarray | None = None,
                       stages: Mapping[str, np.ndarray] | None = None, y: np.ndarray | None = None,
                       subset: Sequence[int] | np.ndarray | None = None) -> dict[str, Any]:
    """Every metric of the module doc for one purification run, as a JSON-able dict.

    ``x_clean``/``x0``: clean and poisoned uint8 NHWC images (``p = x0 - x_clean``); ``p_hat``: stage 1's
    estimate (grey levels); ``stages``: named uint8 outputs (e.g. ``{"input": x0, "after stage 1": x1,
    ..., "output": x3}``); ``y``: labels (for the class-mean check); ``subset``: indices (e.g. the poisoned
    ones under partial poisoning) for which the same block is repeated under ``"subset"``.
    """
    p = true_perturbation(x_clean, x0)
    stages = dict(stages or {})
    for name, xs in stages.items():
        if np.shape(xs) != np.shape(x0):
            raise ValueError(f"stage {name!r} has shape {np.shape(xs)}, expected {np.shape(x0)}")
    if p_hat is not None and np.shape(p_hat) != np.shape(x0):
        raise ValueError(f"p_hat has shape {np.shape(p_hat)}, expected {np.shape(x0)}")
    rep: dict[str, Any] = {"units": "p, p_hat in grey levels (0..255); l2 in [0,1] pixel units",
                           "all": _block(x_clean, p, p_hat, stages, y)}
    if subset is not None:
        idx = np.asarray(subset, dtype=np.int64)
        rep["subset"] = _block(np.asarray(x_clean)[idx], p[idx], None if p_hat is None else np.asarray(p_hat)[idx],
                               {k: np.asarray(v)[idx] for k, v in stages.items()},
                               None if y is None else np.asarray(y)[idx])
    return rep


def report_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Flat rows (one per block and stage) for a Markdown/CSV table: block, stage, psnr, poison left, p_hat."""
    rows: list[dict[str, Any]] = []
    for block in ("all", "subset"):
        b = report.get(block)
        if not b:
            continue
        ph = b.get("p_hat")
        if ph:
            rows.append({"block": block, "stage": "stage-1 p_hat", "n": b["n"], "corr_mean": ph["corr"]["mean"],
                         "corr_q25": ph["corr"]["q25"], "corr_median": ph["corr"]["median"],
                         "corr_q75": ph["corr"]["q75"], "energy_removed": ph["energy_removed"],
                         "p_l2": b["p_l2"]["mean"], "p_hat_l2": ph["p_hat_l2"]["mean"]})
        for name, s in b["stages"].items():
            rows.append({"block": block, "stage": name, "n": b["n"], "psnr_to_clean": s["psnr_to_clean"],
                         "poison_left_corr": s["poison_left_corr"]["mean"],
                         "poison_left_share": s["poison_left_share"]})
    return rows


def residual_grid_rows(p: np.ndarray, p_hat: np.ndarray | None, n: int = 8, x0: np.ndarray | None = None,
                       left: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """uint8 rows ``p``, ``p_hat``, ``p - p_hat`` (around mid-grey, one shared gain so they compare).

    The gain maps the largest |p| of the shown images to the full range; ``x0`` (optional) is put first.
    ``p_hat`` None (a purifier without one): the ``p`` row only. ``left``: named residuals to the clean
    images (e.g. ``{"output - clean": ...}``: poison left plus damage), added as rows at the same gain.
    """
    p = np.asarray(p, dtype=np.float32)[:n]
    m = float(np.abs(p).max()) if p.size else 0.0
    gain = 127.0 / m if m > 0 else 1.0
    zero = np.zeros_like(p)
    rows: dict[str, np.ndarray] = {}
    if x0 is not None:
        rows["poisoned x0"] = np.asarray(x0)[:n]
    rows["p (true)"] = residual_image(p, zero, gain)
    if p_hat is not None:
        q = np.asarray(p_hat, dtype=np.float32)[:n]
        rows["p_hat (stage 1)"] = residual_image(q, zero, gain)
        rows["p - p_hat"] = residual_image(p, q, gain)
    for name, r in (left or {}).items():
        rows[name] = residual_image(np.asarray(r, dtype=np.float32)[:n], zero, gain)
    return rows


def save_residual_grid(p: np.ndarray, p_hat: np.ndarray | None, path: str | Path, n: int = 8,
                       x0: np.ndarray | None = None, title: str | None = None,
                       left: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write the :func:`residual_grid_rows` grid as a PNG (atomically, via :func:`unpoison.viz.save_image_grid`)."""
    return save_image_grid(residual_grid_rows(p, p_hat, n, x0, left), path, n=n, title=title)


# --- one purification run against its clean images ------------------------------------------------------
def poisoned_indices(x_clean: np.ndarray, x0: np.ndarray) -> np.ndarray:
    """Indices of the images of ``x0`` that differ from ``x_clean`` anywhere (the poisoned ones, as stored)."""
    a, b = np.asarray(x_clean), np.asarray(x0)
    return np.flatnonzero((a != b).reshape(len(a), -1).any(1))


def reference_problem(x_clean: np.ndarray, y_clean: np.ndarray, x0: np.ndarray, y0: np.ndarray) -> str | None:
    """Why ``(x_clean, y_clean)`` cannot be the clean version of ``(x0, y0)``, in one phrase, or None.

    The same count, image shape and labels, in the same order: a metric against the wrong images would be
    a number, not an error, so this is checked before anything is measured.
    """
    if len(x_clean) != len(x0):
        return f"its training split has {len(x_clean)} images, the input's has {len(x0)}"
    if np.shape(x_clean)[1:] != np.shape(x0)[1:]:
        return (f"its training images are {'x'.join(map(str, np.shape(x_clean)[1:]))}, the input's are "
                f"{'x'.join(map(str, np.shape(x0)[1:]))}")
    ya, yb = np.asarray(y_clean).astype(np.int64), np.asarray(y0).astype(np.int64)
    if len(ya) != len(yb):
        return f"it has {len(ya)} training labels, the input has {len(yb)}"
    bad = np.flatnonzero(ya != yb)
    if len(bad):
        return (f"its training labels differ from the input's at {len(bad)} of {len(ya)} images (first at index "
                f"{int(bad[0])}: {int(ya[bad[0]])} vs {int(yb[bad[0]])})")
    return None


def purification_report(x_clean: np.ndarray, x0: np.ndarray, x_out: np.ndarray,
                        stages: Mapping[str, np.ndarray] | None = None, p_hat: np.ndarray | None = None,
                        y: np.ndarray | None = None, subset: Sequence[int] | np.ndarray | None = None
                        ) -> dict[str, Any]:
    """:func:`disentangle_report` of a whole purification: stages ``input``, the purifier's ``stages_``,
    ``output``. ``subset`` None: the images that differ from ``x_clean``, when that is some but not all of
    them (partial poisoning); give the attack's indices when they are known."""
    named = {"input": x0, **{k: v for k, v in (stages or {}).items() if k not in ("input", "output")},
             "output": x_out}
    differ = poisoned_indices(x_clean, x0)
    source = "the images that differ from the clean ones"
    if subset is None:
        subset = differ
    else:
        source = "the poisoned indices given"
    idx = np.asarray(subset, dtype=np.int64)
    partial = 0 < len(idx) < len(x0)
    rep = disentangle_report(x_clean, x0, p_hat, named, y, idx if partial else None)
    rep["poisoned"] = {"n": int(len(idx)), "of": int(len(x0)), "n_differ": int(len(differ)), "source": source,
                       "partial": bool(partial)}
    return rep


def _nan_to_none(v: Any) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def headline(report: Mapping[str, Any], block: str = "all") -> dict[str, float | None]:
    """The numbers a table shows per run, flat (None where undefined, e.g. no poison or no ``p_hat``):
    stage 1's ``corr`` (mean, quartiles), ``energy_removed``, mean class-mean corr, ``p_hat``/``p`` l2, and at
    the output the poison left (share) and the PSNR to the clean images."""
    b = report.get(block) or {}
    out: dict[str, float | None] = {"p_l2": _nan_to_none((b.get("p_l2") or {}).get("mean"))}
    ph = b.get("p_hat")
    if ph:
        cc = [v for v in (ph.get("class_corr") or {}).values() if v is not None and np.isfinite(v)]
        out.update(stage1_corr=_nan_to_none(ph["corr"]["mean"]), stage1_corr_q25=_nan_to_none(ph["corr"]["q25"]),
                   stage1_corr_median=_nan_to_none(ph["corr"]["median"]),
                   stage1_corr_q75=_nan_to_none(ph["corr"]["q75"]),
                   stage1_energy_removed=_nan_to_none(ph["energy_removed"]),
                   stage1_class_corr=float(np.mean(cc)) if cc else None,
                   p_hat_l2=_nan_to_none(ph["p_hat_l2"]["mean"]))
    st = b.get("stages") or {}
    if "output" in st:
        out.update(poison_left=_nan_to_none(st["output"]["poison_left_share"]),
                   psnr_clean_output=_nan_to_none(st["output"]["psnr_to_clean"]))
    return out


def _f(v: Any, fmt: str = "{:.3f}") -> str:
    if v is None:
        return "n/a"
    v = float(v)
    if np.isnan(v):
        return "n/a"
    if np.isinf(v):
        return "inf" if v > 0 else "-inf"
    return fmt.format(v)


def report_markdown(report: Mapping[str, Any]) -> str:
    """Markdown tables of a :func:`purification_report` (stage 1's ``p_hat`` vs ``p``; every stage vs the clean
    images), for a report.md; the block ``subset`` (poisoned images only) follows ``all`` when present."""
    lines: list[str] = []
    pz = report.get("poisoned") or {}
    if pz:
        lines.append(f"{pz['n']} of {pz['of']} training images are poisoned ({pz['source']}); "
                     f"p and p_hat in grey levels, l2 in [0, 1] pixel units.")
        lines.append("")
    blocks = [(k, report[k]) for k in ("all", "subset") if report.get(k)]
    if any(b.get("p_hat") for _, b in blocks):
        lines += ["**Stage 1: p_hat against the true perturbation p = x0 - clean**", "",
                  "| images | n | corr(p_hat, p) mean | q25 | median | q75 | energy removed | share of p in p_hat "
                  "| class-mean corr (mean / min) | mean l2 of p | mean l2 of p_hat |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, b in blocks:
            ph = b.get("p_hat")
            if not ph:
                continue
            c = ph["corr"]
            cc = [v for v in (ph.get("class_corr") or {}).values() if v is not None and np.isfinite(v)]
            ccs = f"{_f(np.mean(cc))} / {_f(np.min(cc))}" if cc else "n/a"
            lines.append(f"| {name} | {b['n']} | {_f(c['mean'])} | {_f(c['q25'])} | {_f(c['median'])} | "
                         f"{_f(c['q75'])} | {_f(ph['energy_removed'], '{:.1%}')} | {_f(ph['share'])} | {ccs} | "
                         f"{_f(b['p_l2']['mean'])} | {_f(ph['p_hat_l2']['mean'])} |")
        lines.append("")
    lines += ["**Every stage against the clean images** (poison left = share of p still in stage - clean: "
              "1 = all of it, 0 = none)", "",
              "| images | stage | PSNR to clean (dB) | poison left (share) | corr(stage - clean, p) mean |",
              "|---|---|---|---|---|"]
    for name, b in blocks:
        for stage, s in b["stages"].items():
            lines.append(f"| {name} | {stage} | {_f(s['psnr_to_clean'], '{:.2f}')} | "
                         f"{_f(s['poison_left_share'])} | {_f(s['poison_left_corr']['mean'])} |")
    return "\n".join(lines) + "\n"


def add_perturbation(x: np.ndarray, p: np.ndarray) -> np.ndarray:
    """``clip(round(x + p))`` as uint8: clean images carrying a perturbation in grey levels (Table 1's data)."""
    return np.clip(np.rint(np.asarray(x, dtype=np.float32) + np.asarray(p, dtype=np.float32)), 0, 255
                   ).astype(np.uint8)


def accuracy_on(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy (%) of a trained classifier on uint8 NHWC images ``x`` with labels ``y`` (NaN when empty)."""
    if not len(y):
        return float("nan")
    dev = next(model.parameters()).device
    pred = predict(model, to_device_images(x, dev)).cpu().numpy()
    return float((pred == np.asarray(y)).mean() * 100)


def table1_check(x_clean: np.ndarray, y: np.ndarray, p_hat: np.ndarray, x_poisoned: np.ndarray,
                 x_test: np.ndarray, y_test: np.ndarray, config: Any = None, seed: int = 0, device: Any = "auto",
                 progress: bool = True, classes: Sequence[str] | None = None) -> dict[str, Any]:
    """The paper's Table 1: train a classifier (``config``, a :class:`unpoison.train.TrainConfig`) on
    ``clean + p_hat`` and score it on the clean training images (T), the clean test images (D) and the
    poisoned training images (P). ``p_hat`` that is the poison gives a low D and a high P."""
    x_hat = add_perturbation(x_clean, p_hat)
    ds = ImageDataset(x_hat, np.asarray(y), x_test, np.asarray(y_test), classes=list(classes or []))
    res = train_classifier(ds, None, config, seed, device, progress=progress, desc="Table 1: train on clean + p_hat")
    return {"acc_clean_train": accuracy_on(res.model, x_clean, y), "acc_clean_test": float(res.final_acc),
            "acc_poisoned_train": accuracy_on(res.model, x_poisoned, y), "best_acc_clean_test": float(res.best_acc),
            "psnr_clean_plus_p_hat": psnr_to(x_clean, x_hat), "train_config": res.config,
            "train_time_s": float(res.train_time_s)}
