"""Unsupervised poisoned-sample detection: :func:`detect` with one of :data:`METHODS`.

``signals`` (the default) is the scan's per-sample output (:mod:`unpoison.scan`: the same fits that
give the dataset's verdict, scored out of fold); ``dvae`` is the paper's rule (Sec. 5.1, Table 7):

The rule: fit the stage-1 D-VAE (small KLD limit) on the training set ``x0`` to get the
disentangled poison ``p_hat0``; train a classifier on ``x0 + p_hat0``. The classifier learns the
``p_hat`` shortcut, so on the *original* images it is right on the poisoned ones (they carry the
real poison, which ``p_hat`` imitates) and notably worse on the clean ones. A sample is flagged as
poisoned when that classifier *fits* it: predicts its label on ``x0``. The per-sample score is
the classifier's softmax probability of the true label on ``x0`` (higher = more likely poisoned).
"""

from __future__ import annotations

import csv
import dataclasses
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ._validate import as_labels, as_uint8_nhwc
from .data import ImageDataset
from .defenses import DEFENSES, make_purifier
from .errors import UserError
from .outputs import Policy, atomic_path
from .params import unknown
from .scan import scan
from .tensors import to_device_images
from .train import TrainConfig, predict, train_classifier
from .utils import Timer


@dataclass
class DetectResult:
    scores: np.ndarray
    flags: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def _grey_levels(p: np.ndarray) -> np.ndarray:
    """p_hat as float32 grey levels: the purifiers' convention is 0..255 pixel units (``x0 + p_hat``)."""
    return np.asarray(p).astype(np.float32)


def stage1_p_hat(x: np.ndarray, y: np.ndarray, purifier: str = "dvae", params: dict[str, Any] | None = None,
                 x_apply: np.ndarray | None = None, y_apply: np.ndarray | None = None, device: str = "auto",
                 seed: int = 0, progress: bool = True, checkpoint_dir: str | None = None,
                 preset: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Fit the purifier's stage 1 on ``(x, y)``; return ``p_hat`` (float32 grey levels) for ``x_apply``
    (default ``x``) and the purifier's info.

    With D-VAE only stage 1 is trained and ``estimate_perturbation(x, y, stage="stage1")`` gives
    ``p_hat``; other purifiers run ``fit_purify`` and must leave ``extras_["p_hat"]``. ``preset`` sizes the
    purifier (when it has presets and ``params`` names none); a checkpoint folder makes the fit resumable.
    """
    cls = DEFENSES.get(purifier)
    pur = make_purifier(purifier, params, device=device, seed=seed, progress=progress,
                        preset=preset if "preset" in cls.COMMON else None, checkpoint_dir=checkpoint_dir, resume=None)
    x = as_uint8_nhwc(x)
    y = as_labels(y, len(x))
    xa, ya = (x, y) if x_apply is None else (as_uint8_nhwc(x_apply), as_labels(y_apply, len(x_apply)))
    if pur.tags.p_hat == "infer":
        pur.fit_stage1(x, y)
        p = pur.estimate_perturbation(xa, ya, stage="stage1")
    else:
        if x_apply is not None:
            raise UserError(f"defense {purifier!r} cannot infer p_hat on new images (its tags: p_hat "
                            f"{pur.tags.p_hat!r}, not 'infer')")
        pur.fit_purify(x, y)
        if "p_hat" not in pur.extras_:
            raise UserError(f"defense {purifier!r} exposes no stage-1 p_hat; detection needs one (e.g. dvae)")
        p = pur.extras_["p_hat"]
    p = _grey_levels(p)
    if p.shape != xa.shape:
        raise ValueError(f"p_hat has shape {p.shape} for images {xa.shape}")
    info = {**pur.info_, "params": pur.get_params()}
    if getattr(pur, "history_", None):
        info["history_last"] = {k: h[-1] for k, h in pur.history_.items() if h}
    return p, info


def detect_poison(x: np.ndarray, y: np.ndarray, purifier: str = "dvae", params: dict[str, Any] | None = None,
                  train_config: Any = None, seed: int = 0, device: str = "auto", progress: bool = True,
                  checkpoint_dir: str | None = None, preset: str | None = None) -> DetectResult:
    """Score and flag each training image (see module doc). ``train_config``: a :class:`TrainConfig`
    (default: ``preset``'s, else ``cpu``); ``preset`` also sizes the stage-1 purifier."""
    x = as_uint8_nhwc(x)
    y = as_labels(y, len(x))
    if y is None or len(np.unique(y)) < 2:
        raise UserError("detection needs labels with at least 2 classes")
    timer = Timer()
    with timer("stage1"):
        p_hat, pinfo = stage1_p_hat(x, y, purifier, params, device=device, seed=seed, progress=progress,
                                    checkpoint_dir=checkpoint_dir, preset=preset)
    x_hat = np.clip(np.rint(x.astype(np.float32) + p_hat), 0, 255).astype(np.uint8)
    cfg = train_config or TrainConfig.preset(preset or "cpu")
    # the held-out score is meaningless here: evaluate once (on a copy; the caller's config is left alone)
    cfg = dataclasses.replace(cfg, eval_every=max(cfg.epochs, 1))
    k = min(len(x), 256)
    ds = ImageDataset(x_hat, y, x[:k], y[:k])
    with timer("train"):
        res = train_classifier(ds, None, cfg, seed, device, progress=progress, desc="detect: train on x0 + p_hat")

    model = res.model
    dev = next(model.parameters()).device
    with timer("score"), torch.no_grad():
        xt = to_device_images(x, dev)
        model.eval()
        probs = []
        for i in range(0, len(xt), 512):
            probs.append(torch.softmax(model(xt[i:i + 512].float().div_(255)).float(), 1).cpu())
        pr = torch.cat(probs).numpy()
        pred = predict(model, xt).cpu().numpy()
    scores = pr[np.arange(len(y)), y].astype(np.float64)
    flags = pred == y
    info = {"method": "train on x0 + p_hat0, flag samples the model fits (pred == label on x0)",
            "purifier": purifier, "purifier_info": pinfo, "train": res.summary(), "timings_s": timer.times,
            "n_flagged": int(flags.sum()), "n": int(len(x)),
            "p_hat_mean_l2": float(np.sqrt(((p_hat / 255.0) ** 2).reshape(len(p_hat), -1).sum(1)).mean())}
    return DetectResult(scores=scores, flags=flags, info=info)


#: detection methods: the scan's signals, or the paper's stage-1 p_hat rule
METHODS = ("signals", "dvae")


def detect(x: np.ndarray, y: np.ndarray, method: str = "signals", scan_config: Any = None, seed: int = 0,
           device: str = "auto", progress: bool = True, **dvae: Any) -> DetectResult:
    """Per-sample scores and flags. ``signals``: :func:`unpoison.scan.scan` (``scan_config``: its
    :class:`~unpoison.scan.ScanConfig`); a set it judges clean has no flag. ``dvae``: :func:`detect_poison`
    with ``dvae`` as its keyword arguments."""
    if method == "signals":
        r = scan(x, y, scan_config, seed=seed, device=device, progress=progress)
        return DetectResult(scores=r.sample_scores, flags=r.flags,
                            info={"method": "signals (unpoison.scan)", "scan": r.summary(), "n": int(len(r.flags)),
                                  "n_flagged": int(r.flags.sum()), "timings_s": r.info["timings_s"]})
    if method == "dvae":
        return detect_poison(x, y, seed=seed, device=device, progress=progress, **dvae)
    raise unknown("detection method", method, METHODS)


def write_scores_csv(path: str, res: DetectResult, y: np.ndarray, policy: Policy = "internal") -> None:
    """``index,label,score,flag`` per training image, written atomically (``policy``: see unpoison.outputs)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["index", "label", "score", "flag"])
    for i, (lab, s, f) in enumerate(zip(y, res.scores, res.flags)):
        w.writerow([i, int(lab), f"{s:.6f}", int(bool(f))])
    with atomic_path(path, policy=policy) as tmp:
        tmp.write_text(buf.getvalue())
