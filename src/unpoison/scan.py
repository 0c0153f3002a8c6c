"""Is this dataset poisoned? A verdict before anyone trains on it, and per-sample scores (issue 20).

Availability poisons are shortcuts (Yu et al. 2022; Zhu et al. 2023): small models fit them fast and,
because the shortcut is shared by the poisoned samples, generalise to a held-out half of the *same*
poisoned data better than they do on clean data of that kind; class-wise poisons also leave a
pattern shared by the images of one class. The scan measures four such signals without any clean
reference, every one split-half (fitted on one half, measured on the other, both ways round):

``nb``
    held-out accuracy of a naive Bayes classifier over exact pixel values (the simplest model there is:
    a poison that repeats exact values makes it fit); per sample, its held-out log-likelihood margin;
``linear``
    held-out accuracy of a multinomial logistic regression on the raw pixels (how linearly separable
    the images are by class);
``cnn``
    held-out accuracy of a small CNN after a few epochs (training dynamics: how fast a small model
    finds a rule that transfers); per sample, the held-out log-probability margin of the true label;
``pattern``
    class-conditional residual structure: pixels are rotated into the pooled within-class PCA basis,
    the top ``pattern_k`` (content) components dropped and the rest whitened; the class means of that
    residual, estimated on one half, are correlated with each image of the other half. Dataset level:
    the mean over classes of (mean projection / its spread); per sample: the projection.

``cnn`` is off by default (:data:`DEFAULT_SIGNALS`): on Fashion-MNIST it added nothing the other three
missed and costs most of the time.

Calibration: each statistic is compared with a null measured on *clean* subsets of several sizes and
seeds (``benchmarks/calibrate_scan.py`` writes ``scan_null.json``: the mean per measured size,
interpolated in ``log n``, and the spread pooled over sizes). ``z = (stat - mean(n)) / sd``; the verdict
is ``poisoned`` when the largest ``|z|`` passes ``threshold`` (default 6: under a Gaussian null and three
two-sided tests, a nominal false-positive rate near 6e-9; docs/results/scan-cpu/ states what was
measured). The null is
measured per image geometry (H, W, C); data of a geometry without a null is scanned against the
nearest one and the verdict says ``calibrated: false``.

Per-sample detection (:func:`unpoison.detect.detect` ``method="signals"``) uses the same fits: the
per-sample scores of the signals that fired, robustly standardised per class and weighted by their
dataset-level ``z**2``, split at the per-class median and refined by a two-component naive Bayes per
class (poisoned / clean, exact pixel values, fitted out of fold, four rounds). When the refined split
keeps less than ``split_agree`` of the starting split it has found clusters of the content, not of a
poison, and every sample is flagged (a poison on all of them). A dataset judged clean has no flag.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserError

#: the shipped null (clean statistics per geometry); written by benchmarks/calibrate_scan.py
NULL_FILE = Path(__file__).with_name("scan_null.json")
SIGNALS = ("nb", "linear", "pattern", "cnn")
#: the default set: ``cnn`` adds little over the others here and costs most of the time (opt in)
DEFAULT_SIGNALS = ("nb", "linear", "pattern")
#: which side of the null a poison pushes each statistic to: both (NTGA lowers the held-out accuracy)
DEFAULT_THRESHOLD = 6.0
#: fewer images per class (on average) than this: no scan
MIN_PER_CLASS = 20


@dataclass
class ScanConfig:
    """What the scan fits; the defaults take minutes on one CPU thread for 10,000 Fashion-MNIST images."""

    cnn_model: str = "smallcnn"
    cnn_epochs: int = 4
    cnn_min_steps: int = 150
    nb_alpha: float = 0.1
    split_agree: float = 0.8
    cnn_lr: float = 0.05
    batch_size: int = 128
    linear_steps: int = 100
    pattern_k: int = 100
    threshold: float = DEFAULT_THRESHOLD
    signals: tuple[str, ...] = DEFAULT_SIGNALS


@dataclass
class ScanResult:
    """The verdict (``poisoned``, ``score`` = largest |z|, ``kind``), each signal's evidence, per-sample scores."""

    poisoned: bool
    score: float
    kind: str | None
    evidence: dict[str, dict[str, float]]
    sample_scores: np.ndarray
    flags: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-able: the verdict and evidence (no per-sample arrays)."""
        return {"poisoned": self.poisoned, "score": self.score, "kind": self.kind, "evidence": self.evidence,
                "n_flagged": int(self.flags.sum()), **self.info}


# --- the signals ---------------------------------------------------------------------------------------------
def _halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return perm[: n // 2], perm[n // 2:]


def linear_signal(f: np.ndarray, y: np.ndarray, folds: tuple[np.ndarray, np.ndarray], ncls: int, steps: int,
                  seed: int) -> tuple[float, np.ndarray]:
    """Held-out accuracy (%) of a logistic regression on standardised pixels, and each sample's held-out margin."""
    import torch
    import torch.nn.functional as F

    ft = torch.from_numpy(f)
    yt = torch.from_numpy(y).long()
    margin = np.zeros(len(y))
    correct = 0
    for p, q in (folds, folds[::-1]):
        torch.manual_seed(seed)
        w = torch.zeros(f.shape[1], ncls, requires_grad=True)
        b = torch.zeros(ncls, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=0.05)
        for _ in range(steps):
            opt.zero_grad()
            (F.cross_entropy(ft[p] @ w + b, yt[p]) + 1e-4 * (w ** 2).sum()).backward()
            opt.step()
        with torch.no_grad():
            out = ft[q] @ w + b
        margin[q] = _margin(out, yt[q])
        correct += int((out.argmax(1) == yt[q]).sum())
    return 100.0 * correct / len(y), margin


def _margin(out: Any, y: Any) -> np.ndarray:
    """Log-probability of the true label minus the best other one (higher: fitted more confidently)."""
    import torch

    lp = torch.log_softmax(out.float(), 1)
    idx = torch.arange(len(y))
    true = lp[idx, y].clone()
    lp[idx, y] = -float("inf")
    return (true - lp.max(1).values).cpu().numpy().astype(np.float64)


def cnn_signal(x: np.ndarray, y: np.ndarray, folds: tuple[np.ndarray, np.ndarray], ncls: int, cfg: ScanConfig,
               seed: int, device: str, progress: bool) -> tuple[float, np.ndarray]:
    """Held-out accuracy (%) of a small CNN trained ``cnn_epochs`` on each half, and each sample's held-out margin."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from .models import create_model
    from .tensors import pick_device, rng_scope, to_device_images

    dev = pick_device(device)
    xt = to_device_images(x, dev)
    yt = torch.from_numpy(y).long().to(dev)
    margin = np.zeros(len(y))
    correct = 0
    per_epoch = max(1, math.ceil(len(folds[0]) / cfg.batch_size))
    epochs = max(cfg.cnn_epochs, math.ceil(cfg.cnn_min_steps / per_epoch))  # small sets: enough steps to learn
    steps = 2 * epochs
    bar = tqdm(total=steps, desc="scan: cnn", disable=not progress, leave=False, dynamic_ncols=True)
    for k, (p, q) in enumerate((folds, folds[::-1])):
        with rng_scope(seed + k, dev):
            model = create_model(cfg.cnn_model, ncls, x.shape[3], max(x.shape[1:3])).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.cnn_lr, momentum=0.9, weight_decay=5e-4)
        g = torch.Generator().manual_seed(seed + k)
        pt = torch.from_numpy(p)
        for _ in range(epochs):
            model.train()
            for idx in pt[torch.randperm(len(p), generator=g)].split(cfg.batch_size):
                idx = idx.to(dev)
                opt.zero_grad()
                F.cross_entropy(model(xt[idx].float().div(255)), yt[idx]).backward()
                opt.step()
            bar.update(1)
        model.eval()
        with torch.no_grad():
            qt = torch.from_numpy(q).to(dev)
            out = torch.cat([model(xt[i].float().div(255)) for i in qt.split(512)])
        margin[q] = _margin(out, yt[qt])
        correct += int((out.argmax(1) == yt[qt]).sum())
    bar.close()
    return 100.0 * correct / len(y), margin


def _value_logprob(fc: np.ndarray, offs: np.ndarray, alpha: float) -> np.ndarray:
    """Log-probability of each grey level (0..255) at each pixel among the rows ``fc`` (smoothed by ``alpha``),
    flat: index ``pixel * 256 + value`` (``offs`` = ``pixel * 256``)."""
    cnt = np.bincount((offs + fc).ravel(), minlength=offs.shape[1] * 256).astype(np.float64)
    return np.log(cnt + alpha) - math.log(len(fc) + alpha * 256)


def nb_signal(x: np.ndarray, y: np.ndarray, folds: tuple[np.ndarray, np.ndarray], ncls: int,
              alpha: float) -> tuple[float, np.ndarray]:
    """Held-out accuracy (%) of a naive Bayes classifier over exact pixel values (a histogram of the 256 grey
    levels per class and pixel), and each sample's held-out log-likelihood margin. The simplest model there
    is: a poison that repeats exact values (a class's patch colours, the same noise) makes it fit."""
    n = len(x)
    f = x.reshape(n, -1).astype(np.int64)
    d = f.shape[1]
    offs = np.arange(d)[None] * 256
    margin = np.zeros(n)
    correct = 0
    for p, q in (folds, folds[::-1]):
        lp = np.stack([_value_logprob(f[p[y[p] == c]], offs, alpha) for c in range(ncls)])
        ll = np.stack([lp[c][offs + f[q]].sum(1) for c in range(ncls)], 1)
        idx = np.arange(len(q))
        true = ll[idx, y[q]].copy()
        ll_o = ll.copy()
        ll_o[idx, y[q]] = -np.inf
        margin[q] = true - ll_o.max(1)
        correct += int((ll.argmax(1) == y[q]).sum())
    return 100.0 * correct / n, margin


def pattern_signal(f: np.ndarray, y: np.ndarray, folds: tuple[np.ndarray, np.ndarray], ncls: int,
                   k: int) -> tuple[float, np.ndarray]:
    """Class-conditional residual structure (see module doc): dataset statistic and per-sample projection."""
    n, d = f.shape
    mu = np.stack([f[y == c].mean(0) for c in range(ncls)])
    w = f - mu[y]
    ev, vec = np.linalg.eigh(w.T @ w / n)
    ev, vec = ev[::-1], vec[:, ::-1]
    k = min(k, d - 1)
    er = ev[k:]
    z = (f - f.mean(0)) @ vec[:, k:] / np.sqrt(np.maximum(er, 0) + 1e-3 * max(er.mean(), 1e-12))
    s = np.zeros(n)
    for p, q in (folds, folds[::-1]):
        zp = z[p].mean(0)
        for c in range(ncls):
            pc, qc = p[y[p] == c], q[y[q] == c]
            if not len(pc) or not len(qc):
                continue
            m = z[pc].mean(0) - zp
            s[qc] = (z[qc] - zp) @ m / (np.linalg.norm(m) + 1e-12)
    stats = [s[y == c].mean() / (s[y == c].std() + 1e-12) for c in range(ncls) if (y == c).sum() > 1]
    return float(np.mean(stats)), s


# --- calibration ---------------------------------------------------------------------------------------------
def load_null(path: Path | str | None = None) -> dict[str, Any]:
    """The clean-data null: ``{geometry: {signal: {"a", "b", "sd", "n_runs"}}}`` (mean = a + b log n)."""
    p = Path(path) if path else NULL_FILE
    if not p.is_file():
        return {}
    return json.loads(p.read_text())


def fit_null(rows: list[dict[str, Any]], sd_floor: dict[str, float] | None = None) -> dict[str, dict[str, Any]]:
    """Per signal: the mean of the clean statistics at each measured size ``n`` and their spread pooled over
    sizes (``rows``: ``{n, signal: stat}``, several seeds per size; a floor keeps a lucky null from being
    too narrow)."""
    out: dict[str, dict[str, Any]] = {}
    floor = sd_floor or {"nb": 0.5, "linear": 0.5, "cnn": 0.5, "pattern": 0.1}
    for s in SIGNALS:
        by_n: dict[int, list[float]] = {}
        for r in rows:
            if s in r:
                by_n.setdefault(int(r["n"]), []).append(float(r[s]))
        if not by_n or max(len(v) for v in by_n.values()) < 2:
            continue
        ss = sum(float(((np.array(v) - np.mean(v)) ** 2).sum()) for v in by_n.values())
        dof = sum(len(v) - 1 for v in by_n.values())
        sd = math.sqrt(ss / max(dof, 1))
        sizes = sorted(by_n)
        out[s] = {"n": sizes, "mean": [float(np.mean(by_n[k])) for k in sizes], "sd": max(sd, floor.get(s, 0.0)),
                  "sd_measured": sd, "n_runs": sum(len(v) for v in by_n.values())}
    return out


def null_at(t: dict[str, Any], n: int) -> tuple[float, float, bool]:
    """Null mean and spread for a set of ``n`` images (the measured means interpolated in log n), and whether
    ``n`` lies in the measured range (within a factor 1.5)."""
    lx = np.log(np.asarray(t["n"], dtype=np.float64))
    mean = float(np.interp(math.log(n), lx, t["mean"]))
    inside = t["n"][0] / 1.5 <= n <= t["n"][-1] * 1.5
    return mean, float(t["sd"]), bool(inside)


def _geometry(shape: tuple[int, ...]) -> str:
    return "x".join(str(int(v)) for v in shape[1:])


def _pick_null(null: dict[str, Any], geometry: str) -> tuple[dict[str, Any], bool]:
    null = {g: t for g, t in null.items() if not g.startswith("_")}
    if geometry in null:
        return null[geometry], True
    if not null:
        return {}, False
    d = int(np.prod([int(v) for v in geometry.split("x")]))
    best = min(null, key=lambda g: abs(int(np.prod([int(v) for v in g.split("x")])) - d))
    return null[best], False


def calibrated_for(shape: tuple[int, ...], n_classes: int, null: dict[str, Any] | None = None) -> str | None:
    """Why a verdict on a set of ``shape`` (N, H, W[, C]) would not be calibrated, or None when it would: the
    null must hold this geometry and every signal's measured sizes must cover N (a factor 1.5 either way)."""
    n = int(shape[0])
    if n < MIN_PER_CLASS * max(n_classes, 1):
        return f"{n} images for {n_classes} classes (the scan needs {MIN_PER_CLASS} per class)"
    geometry = _geometry(shape if len(shape) == 4 else (*shape, 1))
    table, ok = _pick_null(load_null() if null is None else null, geometry)
    if not ok:
        return f"no clean null for {geometry} images"
    if not all(null_at(t, n)[2] for s, t in table.items() if s in DEFAULT_SIGNALS):
        return f"the {geometry} null was measured at other set sizes than {n}"
    return None


# --- the scan --------------------------------------------------------------------------------------------------
def measure(x: np.ndarray, y: np.ndarray, cfg: ScanConfig | None = None, seed: int = 0, device: str = "auto",
            progress: bool = True) -> tuple[dict[str, float], dict[str, np.ndarray], dict[str, float]]:
    """The raw signals: dataset statistics, per-sample scores, timings (s). ``x`` uint8 NHWC, ``y`` int labels."""
    from ._validate import as_labels, as_uint8_nhwc

    cfg = cfg or ScanConfig()
    x = as_uint8_nhwc(x)
    y = as_labels(y, len(x))
    if y is None:
        raise UserError("the scan needs labels")
    classes, y = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise UserError("the scan needs labels with at least 2 classes")
    if len(x) < MIN_PER_CLASS * len(classes):
        raise UserError(f"the scan needs at least {MIN_PER_CLASS} images per class on average, got {len(x)} for "
                        f"{len(classes)} classes")
    unknown = sorted(set(cfg.signals) - set(SIGNALS))
    if unknown:
        raise UserError(f"unknown scan signal(s) {', '.join(unknown)}; known: {', '.join(SIGNALS)}")
    ncls = len(classes)
    folds = _halves(len(x), seed)
    f = x.reshape(len(x), -1).astype(np.float32) / 255.0
    stats: dict[str, float] = {}
    per: dict[str, np.ndarray] = {}
    times: dict[str, float] = {}
    if "nb" in cfg.signals:
        t0 = time.time()
        stats["nb"], per["nb"] = nb_signal(x, y, folds, ncls, cfg.nb_alpha)
        times["nb"] = time.time() - t0
    if "linear" in cfg.signals:
        t0 = time.time()
        fs = (f - f.mean(0)) / (f.std() + 1e-8)
        stats["linear"], per["linear"] = linear_signal(fs, y, folds, ncls, cfg.linear_steps, seed)
        times["linear"] = time.time() - t0
    if "pattern" in cfg.signals:
        t0 = time.time()
        stats["pattern"], per["pattern"] = pattern_signal(f.astype(np.float64), y, folds, ncls, cfg.pattern_k)
        times["pattern"] = time.time() - t0
    if "cnn" in cfg.signals:
        t0 = time.time()
        stats["cnn"], per["cnn"] = cnn_signal(x, y, folds, ncls, cfg, seed, device, progress)
        times["cnn"] = time.time() - t0
    return stats, per, times


def _robust_z(s: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = np.zeros_like(s)
    for c in np.unique(y):
        m = y == c
        med = np.median(s[m])
        mad = np.median(np.abs(s[m] - med)) * 1.4826
        out[m] = (s[m] - med) / (mad if mad > 0 else (s[m].std() + 1e-12))
    return out


def refine_split(x: np.ndarray, y: np.ndarray, init: np.ndarray, folds: tuple[np.ndarray, np.ndarray],
                 alpha: float, rounds: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a two-component naive Bayes over exact pixel values (poisoned / clean), started from ``init``
    and re-fitted ``rounds`` times, each half scored by the components fitted on the other half. Returns the
    flags and each sample's held-out log-likelihood ratio (poisoned vs clean component)."""
    n = len(x)
    f = x.reshape(n, -1).astype(np.int64)
    d = f.shape[1]
    offs = np.arange(d)[None] * 256
    flags = init.copy()
    llr = np.zeros(n)
    for _ in range(rounds):
        for p, q in (folds, folds[::-1]):
            for c in np.unique(y):
                pc, qc = p[y[p] == c], q[y[q] == c]
                lps = [_value_logprob(f[pc[flags[pc] == comp]], offs, alpha) for comp in (True, False)]
                llr[qc] = (lps[0] - lps[1])[offs + f[qc]].sum(1)
        flags = llr > 0
    return flags, llr


def split_flags(x: np.ndarray, y: np.ndarray, score: np.ndarray, folds: tuple[np.ndarray, np.ndarray],
                alpha: float, agree_min: float) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
    """The flags of a set judged poisoned: the upper half of ``score`` per class, refined by
    :func:`refine_split`; when the refined split agrees with the start on fewer than ``agree_min`` of the
    samples, it found clusters of the content rather than of the poison, and every sample is flagged
    (a poison on all of them leaves no clean component to split off)."""
    init = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        m = y == c
        init[m] = score[m] > np.median(score[m])
    refined, llr = refine_split(x, y, init, folds, alpha)
    agree = float(np.mean(refined == init))
    info = {"split_agreement": agree, "agree_min": agree_min, "split_fraction": float(refined.mean())}
    if agree >= agree_min and refined.any() and not refined.all():
        return refined, {**info, "split": True}, llr
    return np.ones(len(y), dtype=bool), {**info, "split": False}, llr


def scan(x: np.ndarray, y: np.ndarray, config: ScanConfig | None = None, seed: int = 0, device: str = "auto",
         progress: bool = True, null: dict[str, Any] | None = None) -> ScanResult:
    """Verdict, score, kind, evidence and per-sample scores/flags for a labelled image set (see module doc)."""
    cfg = config or ScanConfig()
    t0 = time.time()
    stats, per, times = measure(x, y, cfg, seed, device, progress)
    y_arr = np.asarray(y).reshape(-1)
    geometry = _geometry(np.asarray(x).shape if np.asarray(x).ndim == 4 else (*np.asarray(x).shape, 1))
    table, calibrated = _pick_null(load_null() if null is None else null, geometry)
    n = len(y_arr)
    evidence: dict[str, dict[str, float]] = {}
    for s, v in stats.items():
        e: dict[str, float] = {"stat": float(v)}
        if s in table:
            e["null_mean"], e["null_sd"], inside = null_at(table[s], n)
            e["z"] = (v - e["null_mean"]) / e["null_sd"]
            calibrated = calibrated and inside
        evidence[s] = e
    zs = {s: e["z"] for s, e in evidence.items() if "z" in e}
    score = max((abs(z) for z in zs.values()), default=0.0)
    poisoned = bool(zs) and score >= cfg.threshold
    kind = None
    if poisoned:
        top = max(zs, key=lambda s: abs(zs[s]))
        kind = "class-wise" if top == "pattern" or zs.get("pattern", 0.0) >= cfg.threshold else "sample-wise"
    # per-sample: the signals that fired (upwards), each robustly standardised per class, weighted by z^2
    fired = {s: zs[s] ** 2 for s in per if zs.get(s, 0.0) >= cfg.threshold}
    weights = fired or {s: 1.0 for s in per}
    tot = sum(weights.values())
    sample = sum(w / tot * _robust_z(per[s], y_arr) for s, w in weights.items())
    sample = np.asarray(sample, dtype=np.float64)
    mix: dict[str, Any] = {}
    if poisoned:
        from ._validate import as_uint8_nhwc

        flags, mix, llr = split_flags(as_uint8_nhwc(x), y_arr, sample, _halves(n, seed), cfg.nb_alpha,
                                      cfg.split_agree)
        if mix["split"]:
            sample = llr  # the refined split's evidence: > 0 exactly where flagged
    else:
        flags = np.zeros(n, dtype=bool)
    info = {"n": n, "geometry": geometry, "calibrated": calibrated, "threshold": cfg.threshold,
            "sample_weights": {s: w / tot for s, w in weights.items()}, "split": mix,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
            "timings_s": {**times, "total": time.time() - t0}, "seed": seed}
    return ScanResult(poisoned, float(score), kind, evidence, sample, flags, info)
