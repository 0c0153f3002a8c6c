"""Is this dataset poisoned? A verdict before anyone trains on it, and per-sample scores (issue 20).

Availability poisons are shortcuts (Yu et al. 2022; Zhu et al. 2023): small models fit them fast and,
because the shortcut is shared by the poisoned samples, generalise to a held-out half of the *same*
poisoned data better than they do on clean data of that kind; class-wise poisons also leave a
pattern shared by the images of one class. The scan measures four such signals, every one split-half
(fitted on one half, measured on the other, both ways round):

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

The verdict needs no null for the kind of data (issue 24). Each statistic is compared with the same
statistic on the *same images* after :func:`content_reference` (each 2x2 block averaged, resized back,
rounded to 8 grey levels per channel): what a poison within an availability budget can carry (8/255 per
pixel, one pixel, a faint class pattern) does not survive it, the shapes and colours do. A poison makes
the data easier than its content; content alone makes the reference *easier* for naive Bayes (fewer
values to estimate) and costs the linear model a point or two. The effect (data minus reference: points
of held-out accuracy; for ``pattern`` the log ratio) must exceed :data:`MARGINS` by ``self_threshold``
(3) spreads, the spread resampled from the same split (a bootstrap over the images of the paired
per-image difference; for ``pattern`` the spread over classes of the log ratios) and from further splits
(``ref_splits``). ``clean_reference`` (``--clean-reference SPEC``) adds the same test against a small
clean labelled sample of the same kind of images, the data subsampled to its size, with no margin. The
shipped Fashion-MNIST null (``benchmarks/calibrate_scan.py`` writes ``scan_null.json``: clean statistics
per size, interpolated in ``log n``, spread pooled) is one more check, used only where it was measured
(28x28x1, set sizes within a factor 1.5 of 1,000-10,000): ``|z| >= threshold`` (6). The score is the
largest test statistic in units of its threshold (>= 1: poisoned); ``info["verdict"]`` names every test
and those that fired. False verdicts measured on domains the margins were not set on:
docs/results/scan-anydomain/. The scan draws nothing from torch's or numpy's global generators.

Per-sample detection (:func:`unpoison.detect.detect` ``method="signals"``) uses the same fits. An exact
colour at one place shared by part of every class and ~absent elsewhere (a one-pixel shortcut) gives the
flags directly (:func:`shared_values`). Otherwise the per-sample scores of the signals that fired,
robustly standardised per class and weighted by their ``(z / threshold)**2``, split at the per-class
median and refined by a two-component naive Bayes per class (poisoned / clean, exact pixel values,
fitted out of fold, four rounds). When the refined split keeps less than ``split_agree`` of the starting
split it has found clusters of the content, not of a poison, and every sample is flagged (a poison on
all of them). A dataset judged clean has no flag.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ._validate import as_labels, as_uint8_nhwc
from .errors import UserError
from .models import create_model
from .tensors import pick_device, rng_scope, to_device_images

#: the shipped null (clean statistics per geometry); written by benchmarks/calibrate_scan.py
NULL_FILE = Path(__file__).with_name("scan_null.json")
SIGNALS = ("nb", "linear", "pattern", "cnn")
#: the default set: ``cnn`` adds little over the others here and costs most of the time (opt in)
DEFAULT_SIGNALS = ("nb", "linear", "pattern")
#: which side of the null a poison pushes each statistic to: both (NTGA lowers the held-out accuracy)
DEFAULT_THRESHOLD = 6.0
#: the self-calibrated test's threshold: the effect beyond its margin, in spreads
DEFAULT_SELF_THRESHOLD = 3.0
#: grey levels per channel of :func:`content_reference`
REF_LEVELS = 8
#: the signals the self-calibrated test uses. Not ``nb``: exact pixel values are content on some data (icon
#: themes' exact palette colours: the held-out icon set's clean 2,000 images gave an nb effect of +15 points
#: against the reference), so no transformation separates a poison's exact values from the content's there;
#: ``nb`` is still measured against the reference (evidence), against a clean reference and against the null
SELF_TESTED = ("linear", "pattern", "cnn")
#: the effect (data minus its content reference) content alone gives at most, per signal: points of
#: held-out accuracy (nb, linear, cnn) or the log ratio of the pattern statistics. Set on the tuning
#: domains (clean Fashion-MNIST, Fashion-MNIST padded to 32x32 and tinted, the tests' synthetic sets), where
#: the largest clean effects were nb -2.4, linear +2.1, pattern log 1.65; the held-out domains'
#: are in docs/results/scan-anydomain/ (``cnn``'s margin was not measured: opt-in signal)
MARGINS = {"nb": 10.0, "linear": 5.0, "cnn": 8.0, "pattern": math.log(2.5)}
#: share of the per-sample pattern projection's variance two groups per class must explain to be the flags
BIMODAL = 0.8
#: how much more often (than in the other classes) a class's exact colour at one place must occur, in the
#: median class (ENRICH) and in every class (ENRICH_MIN), for :func:`shared_values` to give the flags (a
#: one-pixel poison in a bright part of the image is rarer elsewhere by only 20-160x on Fashion-MNIST)
ENRICH = 200.0
ENRICH_MIN = 10.0
#: at most this many places (median class) within half the best one's enrichment and share: a one-pixel (or
#: few-pixel) poison, not a class pattern written onto a flat background (LSP on Fashion-MNIST's black)
MAX_PLACES = 3
#: floor under the pattern effect's resampled spread (log ratio)
PATTERN_LOG_SD = 0.05
#: floor under an accuracy effect's spread (points)
ACC_SD_FLOOR = 0.5
#: bootstrap draws for an accuracy effect's spread
BOOTSTRAP = 200
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
    self_threshold: float = DEFAULT_SELF_THRESHOLD
    ref_splits: int = 1


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

    ft = torch.from_numpy(f)
    yt = torch.from_numpy(y).long()
    margin = np.zeros(len(y))
    correct = 0
    for p, q in (folds, folds[::-1]):  # zero start, full batch: deterministic, no generator needed
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


def probe_accuracy(x: np.ndarray, y: np.ndarray, steps: int = 100, seed: int = 0) -> float:
    """How easily ``x`` (uint8 NHWC) gives away its labels: the held-out accuracy (%) of the scan's linear model
    (two folds). Availability poisons are, by design, easier than their content; a change that raises it made
    the images easier in the same way (the D-VAE's subtraction gate, :mod:`unpoison.defenses.dvae`)."""
    classes, yy = np.unique(np.asarray(y), return_inverse=True)
    f = np.asarray(x).reshape(len(x), -1).astype(np.float32) / 255.0
    fs = (f - f.mean(0)) / (f.std() + 1e-8)
    with torch.enable_grad():  # callers may run under no_grad; the probe is trained here
        return linear_signal(fs, yy, _halves(len(yy), seed), len(classes), steps, seed)[0]


def _margin(out: Any, y: Any) -> np.ndarray:
    """Log-probability of the true label minus the best other one (higher: fitted more confidently)."""

    lp = torch.log_softmax(out.float(), 1)
    idx = torch.arange(len(y))
    true = lp[idx, y].clone()
    lp[idx, y] = -float("inf")
    return (true - lp.max(1).values).cpu().numpy().astype(np.float64)


def cnn_signal(x: np.ndarray, y: np.ndarray, folds: tuple[np.ndarray, np.ndarray], ncls: int, cfg: ScanConfig,
               seed: int, device: str, progress: bool) -> tuple[float, np.ndarray]:
    """Held-out accuracy (%) of a small CNN trained ``cnn_epochs`` on each half, and each sample's held-out margin."""

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
                   k: int, parts: list[float] | None = None) -> tuple[float, np.ndarray]:
    """Class-conditional residual structure (see module doc): dataset statistic and per-sample projection;
    ``parts`` receives the per-class statistics (for a paired spread)."""
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
    stats = [s[y == c].mean() / (s[y == c].std() + 1e-12) if (y == c).sum() > 1 else float("nan")
             for c in range(ncls)]
    if parts is not None:
        parts[:] = stats
    good = [v for v in stats if math.isfinite(v)]
    return float(np.mean(good)) if good else 0.0, s


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


# --- the scan --------------------------------------------------------------------------------------------------
def measure(x: np.ndarray, y: np.ndarray, cfg: ScanConfig | None = None, seed: int = 0, device: str = "auto",
            progress: bool = True, parts: dict[str, Any] | None = None,
            ) -> tuple[dict[str, float], dict[str, np.ndarray], dict[str, float]]:
    """The raw signals: dataset statistics, per-sample scores, timings (s). ``x`` uint8 NHWC, ``y`` int labels.
    ``parts`` (a dict) receives what a paired spread needs: the pattern statistic per fold and class."""

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
        pp: list[float] = []
        stats["pattern"], per["pattern"] = pattern_signal(f.astype(np.float64), y, folds, ncls, cfg.pattern_k, pp)
        if parts is not None:
            parts["pattern"] = np.asarray(pp)
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


def two_groups(score: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Per class, the cut of ``score`` that best splits it in two (Otsu: the most between-group variance);
    returns the upper groups and the share of the variance the cuts explain (1: two point masses)."""
    flags = np.zeros(len(y), dtype=bool)
    between = total = 0.0
    for c in np.unique(y):
        m = np.flatnonzero(y == c)
        v = np.sort(score[m])
        if len(v) < 4 or v[-1] == v[0]:
            continue
        k = np.arange(1, len(v))
        cs = np.cumsum(v)[:-1]
        m0, m1 = cs / k, (v.sum() - cs) / (len(v) - k)
        b = k * (len(v) - k) / len(v) * (m1 - m0) ** 2
        j = int(np.argmax(b))
        flags[m] = score[m] > v[j]
        between += float(b[j])
        total += float(((v - v.mean()) ** 2).sum())
    return flags, between / total if total > 0 else 0.0


def shared_values(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Per class, the pixel and exact colour most over-represented in that class against the others (a
    one-pixel or exact-patch poison writes the same colour at the same place into every image it poisons);
    returns the images that carry their class's colour there, and per class the share and enrichment. Used
    for flags only where the median class has a colour :data:`ENRICH` times more frequent than in the
    others and every class one :data:`ENRICH_MIN` times."""
    n = len(x)
    h, w, c = x.shape[1:]
    code = np.zeros((n, h * w), dtype=np.int64)
    for ch in range(c):
        code = code * 256 + x[..., ch].reshape(n, -1)
    code += np.arange(h * w, dtype=np.int64)[None] << 24
    allv, allc = np.unique(code, return_counts=True)
    flags = np.zeros(n, dtype=bool)
    info: dict[str, Any] = {"classes": {}}
    ok = True
    for cl in np.unique(y):
        m = np.flatnonzero(y == cl)
        v, cnt = np.unique(code[m], return_counts=True)
        other = allc[np.searchsorted(allv, v)] - cnt
        share = cnt / len(m)
        enrich = share / ((other + 1) / (n - len(m) + 1))
        enrich[share < 0.05] = 0
        strong = np.flatnonzero(enrich >= ENRICH)  # of the strongly enriched, the most shared (a poison's)
        j = int(strong[np.argmax(share[strong])]) if len(strong) else int(np.argmax(enrich))
        pix = int(v[j] >> 24)
        hit = code[m, pix] == v[j]
        flags[m] = hit
        # a one-pixel poison: nothing else comes close; a pattern on a flat background: many places do
        near = (enrich >= enrich[j] / 2) & (share >= share[j] / 2)
        places = len(np.unique(v[near] >> 24))
        info["classes"][int(cl)] = {"pixel": pix, "share": float(share[j]), "enrichment": float(enrich[j]),
                                    "places": places}
        ok = ok and bool(enrich[j] >= ENRICH_MIN)
    med = float(np.median([v["enrichment"] for v in info["classes"].values()]))
    places = float(np.median([v["places"] for v in info["classes"].values()]))
    info["all_enriched"] = ok and med >= ENRICH and places <= MAX_PLACES
    return flags, info


def split_flags(x: np.ndarray, y: np.ndarray, score: np.ndarray, folds: tuple[np.ndarray, np.ndarray],
                alpha: float, agree_min: float,
                pattern: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
    """The flags of a set judged poisoned. An exact class-wise colour on part of each class (one pixel) makes
    the images carrying it (:func:`shared_values`) the flags when the classes have one. A class-wise pattern
    on part of each class makes the per-sample ``pattern`` projection two clear groups per class: when the
    cuts of :func:`two_groups` explain at least :data:`BIMODAL` of its variance, the upper groups are
    flagged. Otherwise the upper
    half of ``score`` per class, refined by :func:`refine_split`; when the refined split agrees with the
    start on fewer than ``agree_min`` of the samples, it found clusters of the content rather than of the
    poison, and every sample is flagged (a poison on all of them leaves no clean component to split off)."""
    shared, sinfo = shared_values(x, y)
    if sinfo["all_enriched"] and shared.any():
        return shared, {"split": not shared.all(), "by": "shared exact colour", "split_fraction":
                        float(shared.mean())}, shared.astype(np.float64)
    if pattern is not None:
        groups, explained = two_groups(pattern, y)
        if explained >= BIMODAL and groups.any() and not groups.all():
            return groups, {"split": True, "by": "pattern groups", "explained": explained,
                            "split_fraction": float(groups.mean())}, pattern
    init = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        m = y == c
        init[m] = score[m] > np.median(score[m])
    refined, llr = refine_split(x, y, init, folds, alpha)
    agree = float(np.mean(refined == init))
    info = {"split_agreement": agree, "agree_min": agree_min, "split_fraction": float(refined.mean())}
    if agree >= agree_min and refined.any() and not refined.all():
        return refined, {**info, "split": True, "by": "refined naive Bayes"}, llr
    return np.ones(len(y), dtype=bool), {**info, "split": False}, llr


# --- the self-calibrated verdict ------------------------------------------------------------------------------
def content_reference(x: np.ndarray, levels: int = REF_LEVELS) -> np.ndarray:
    """The same images with what a small poison can carry removed and the content kept: each 2x2 block
    averaged, resized back (bilinear) and rounded to ``levels`` grey levels per channel. A perturbation within
    an availability budget (8/255 per pixel, one pixel, small patches) does not survive both; shapes and
    colours do. No randomness."""

    h, w = x.shape[1:3]
    out = np.empty(x.shape, dtype=np.uint8)
    step = 255.0 / (levels - 1)
    for i in range(0, len(x), 4096):  # a copy per chunk: read-only / memory-mapped input is fine
        t = torch.from_numpy(np.array(x[i:i + 4096], dtype=np.float32)).permute(0, 3, 1, 2)
        d = F.avg_pool2d(t, 2, ceil_mode=True)
        u = F.interpolate(d, size=(h, w), mode="bilinear", align_corners=False)
        u = torch.round(u / step) * step
        out[i:i + 4096] = u.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def _paired_spread(s: str, a_per: np.ndarray, b_per: np.ndarray, a_parts: Any, b_parts: Any,
                   rng: np.random.Generator) -> float:
    """Spread of one split's effect, resampled from that split: for an accuracy, a bootstrap over the images
    of the per-image difference (held out correct on the data minus on the reference: the same images, so
    paired); for the pattern, the spread of the mean over classes of the log ratios."""
    if s == "pattern":
        a, b = np.asarray(a_parts, dtype=np.float64), np.asarray(b_parts, dtype=np.float64)
        ok = np.isfinite(a) & np.isfinite(b)
        lr = np.log(np.maximum(a[ok], 0.05) / np.maximum(b[ok], 0.05))
        return float(lr.std(ddof=1) / math.sqrt(len(lr))) if len(lr) > 1 else PATTERN_LOG_SD
    if len(a_per) == len(b_per):  # the same images
        d = (a_per > 0).astype(np.float64) - (b_per > 0)
    else:  # a clean reference: two independent samples
        ia = rng.integers(0, len(a_per), (BOOTSTRAP, len(a_per)))
        ib = rng.integers(0, len(b_per), (BOOTSTRAP, len(b_per)))
        return float(100.0 * ((a_per > 0)[ia].mean(1) - (b_per > 0)[ib].mean(1)).std())
    idx = rng.integers(0, len(d), (BOOTSTRAP, len(d)))
    return float(100.0 * d[idx].mean(1).std())


def _effect(s: str, a: float, b: float) -> float:
    """How far statistic ``s`` of the data (``a``) lies above its reference (``b``): points of accuracy, or
    the log ratio of the pattern statistics (its scale follows the data's, the ratio does not)."""
    if s == "pattern":
        return math.log(max(a, 0.05) / max(b, 0.05))
    return a - b


def paired_test(x: np.ndarray, y: np.ndarray, ref: tuple[np.ndarray, np.ndarray] | None, cfg: ScanConfig,
                seed: int, device: str, first: tuple[dict[str, float], dict[str, np.ndarray], dict[str, Any]],
                ) -> dict[str, dict[str, float]]:
    """The verdict's test, per signal: the statistic on the data against the same statistic on a reference,
    over ``cfg.ref_splits`` random half-splits (``first``: the data's first split, already measured).

    Without ``ref`` the reference is :func:`content_reference` of the same images (a paired test: the same
    images, the same splits); a poison makes the data easier than its content, so the effect must exceed
    :data:`MARGINS` (what content alone was measured to give) by ``cfg.self_threshold`` spreads. With
    ``ref`` (a clean sample) the data is subsampled to the reference's size each split and no margin applies:
    the same distribution gives no effect on average. The spread: resampled within each split (see
    :func:`_paired_spread`), combined with the spread between splits where there are several."""
    out: dict[str, dict[str, float]] = {}
    sub = tuple(cfg.signals)
    eff: dict[str, list[float]] = {s: [] for s in sub}
    var: dict[str, list[float]] = {s: [] for s in sub}
    raw: dict[str, list[tuple[float, float]]] = {s: [] for s in sub}
    rng = np.random.default_rng(seed + 7919)
    for k in range(max(cfg.ref_splits, 1)):
        if ref is None:
            if k == 0:
                a, a_per, a_parts = first
            else:
                a_parts = {}
                a, a_per, _ = measure(x, y, cfg, seed + k, device, False, a_parts)
        else:  # the data at the reference's size, a fresh draw each split
            idx = np.sort(rng.choice(len(y), size=min(len(ref[1]), len(y)), replace=False))
            a_parts = {}
            a, a_per, _ = measure(x[idx], y[idx], cfg, seed + k, device, False, a_parts)
        b: dict[str, float] = {}
        b_per: dict[str, np.ndarray] = {}
        b_parts: dict[str, Any] = {}
        if ref is not None:
            b, b_per, _ = measure(ref[0], ref[1], cfg, seed + k, device, False, b_parts)
        else:
            b, b_per, _ = measure(content_reference(x), y, cfg, seed + k, device, False, b_parts)
        for s in sub:
            eff[s].append(_effect(s, a[s], b[s]))
            var[s].append(_paired_spread(s, a_per.get(s, np.zeros(0)), b_per.get(s, np.zeros(0)),
                                         a_parts.get(s), b_parts.get(s), rng) ** 2)
            raw[s].append((a[s], b[s]))
    margins = MARGINS if ref is None else {}
    for s in sub:
        e = np.asarray(eff[s])
        within = math.sqrt(float(np.mean(var[s])) / len(e))
        between = float(e.std(ddof=1)) / math.sqrt(len(e)) if len(e) > 1 else 0.0
        sd = max(within, between, PATTERN_LOG_SD if s == "pattern" else ACC_SD_FLOOR)
        m = margins.get(s, 0.0)
        out[s] = {"stat": float(np.mean([r[0] for r in raw[s]])), "ref": float(np.mean([r[1] for r in raw[s]])),
                  "effect": float(e.mean()), "margin": m, "sd": sd, "z": (float(e.mean()) - m) / sd}
    return out


def scan(x: np.ndarray, y: np.ndarray, config: ScanConfig | None = None, seed: int = 0, device: str = "auto",
         progress: bool = True, null: dict[str, Any] | None = None,
         clean_reference: tuple[np.ndarray, np.ndarray] | None = None) -> ScanResult:
    """Verdict, score, kind, evidence and per-sample scores/flags for a labelled image set (see module doc).

    ``clean_reference``: a small clean labelled sample of the same kind of images (uint8 NHWC, labels in the
    same classes); it adds a test against it to the self-calibrated one. Draws no global random state."""

    cfg = config or ScanConfig()
    t0 = time.time()
    x = as_uint8_nhwc(x)
    parts: dict[str, Any] = {}
    stats, per, times = measure(x, y, cfg, seed, device, progress, parts)
    y_raw = as_labels(y, len(x))
    classes, y_arr = np.unique(y_raw, return_inverse=True)
    n = len(y_arr)
    geometry = _geometry(x.shape)
    t1 = time.time()
    self_test = paired_test(x, y_arr, None, cfg, seed, device, (stats, per, parts))
    times["self_reference"] = time.time() - t1
    ref_test: dict[str, dict[str, float]] = {}
    if clean_reference is not None:
        t1 = time.time()
        ref_test = paired_test(x, y_arr, _check_reference(x, y_raw, classes, *clean_reference), cfg, seed, device,
                               (stats, per, parts))
        times["clean_reference"] = time.time() - t1
    # the shipped Fashion-MNIST null: one more check, used only where it was measured (geometry, set size)
    table, calibrated = _pick_null(load_null() if null is None else null, geometry)
    evidence: dict[str, dict[str, float]] = {}
    null_z: dict[str, float] = {}
    for s, v in stats.items():
        e: dict[str, float] = {"stat": float(v)}
        if s in self_test:
            e.update({f"self_{k}": v2 for k, v2 in self_test[s].items() if k != "stat"})
        if s in ref_test:
            e.update({f"clean_{k}": v2 for k, v2 in ref_test[s].items()})
        if s in table:
            mean, sd, inside = null_at(table[s], n)
            calibrated = calibrated and inside
            e.update(null_mean=mean, null_sd=sd, null_z=(v - mean) / sd)
            null_z[s] = e["null_z"]
        evidence[s] = e
    null_used = calibrated and bool(null_z)
    tests = {f"self:{s}": (t["z"], cfg.self_threshold) for s, t in self_test.items() if s in SELF_TESTED}
    tests.update({f"clean:{s}": (t["z"], cfg.self_threshold) for s, t in ref_test.items()})
    if null_used:
        tests.update({f"null:{s}": (abs(z), cfg.threshold) for s, z in null_z.items()})
    # the score: the largest test statistic in units of its own threshold (>= 1: poisoned); per signal too
    score = max((z / thr for z, thr in tests.values()), default=0.0)
    for s, e in evidence.items():
        mine = [(z / thr, t) for t, (z, thr) in tests.items() if t.split(":", 1)[1] == s]
        if mine:
            v, t = max(mine)
            e["z"] = -v if t.startswith("null:") and null_z[s] < 0 else v  # the null's side kept
    fired_tests = sorted(t for t, (z, thr) in tests.items() if z >= thr)
    poisoned = bool(fired_tests)
    kind = None
    fired = {}
    for t in fired_tests:
        s = t.split(":", 1)[1]
        z = tests[t][0]
        if t.startswith("null:") and null_z[s] < 0:
            continue  # below the null (NTGA's linear): no per-sample direction
        fired[s] = max(fired.get(s, 0.0), (z / tests[t][1]) ** 2)
    if poisoned:
        kind = "class-wise" if any(t.endswith(":pattern") for t in fired_tests) else "sample-wise"
    # per-sample: the signals that fired, each robustly standardised per class, weighted by (z/threshold)^2
    weights = {s: w for s, w in fired.items() if s in per} or {s: 1.0 for s in per}
    tot = sum(weights.values())
    sample = np.asarray(sum(w / tot * _robust_z(per[s], y_arr) for s, w in weights.items()), dtype=np.float64)
    mix: dict[str, Any] = {}
    if poisoned:
        flags, mix, llr = split_flags(x, y_arr, sample, _halves(n, seed), cfg.nb_alpha, cfg.split_agree,
                                      per.get("pattern"))
        if mix["split"]:
            sample = llr  # the refined split's evidence: > 0 exactly where flagged
    else:
        flags = np.zeros(n, dtype=bool)
    info = {"n": n, "geometry": geometry, "threshold": 1.0, "self_threshold": cfg.self_threshold,
            "null_threshold": cfg.threshold,
            "verdict": {"tests": {t: {"z": z, "threshold": thr} for t, (z, thr) in tests.items()},
                        "fired": fired_tests, "null_used": null_used,
                        "clean_reference": None if clean_reference is None else int(len(clean_reference[1]))},
            "calibrated": True, "null_calibrated": calibrated,
            "sample_weights": {s: w / tot for s, w in weights.items()}, "split": mix,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
            "timings_s": {**times, "total": time.time() - t0}, "seed": seed}
    return ScanResult(poisoned, float(score), kind, evidence, sample, flags, info)


def _check_reference(x: np.ndarray, y: np.ndarray, classes: np.ndarray, xr: Any,
                     yr: Any) -> tuple[np.ndarray, np.ndarray]:
    """A clean reference usable against ``x``: same image geometry, labels among ``x``'s classes, enough
    images per class; labels re-indexed like ``x``'s."""

    xr = as_uint8_nhwc(xr)
    yr = as_labels(yr, len(xr))
    if yr is None:
        raise UserError("the clean reference needs labels")
    if xr.shape[1:] != x.shape[1:]:
        raise UserError(f"the clean reference has {_geometry(xr.shape)} images, the data {_geometry(x.shape)}")
    extra = sorted(set(np.unique(yr).tolist()) - set(classes.tolist()))
    if extra:
        raise UserError(f"the clean reference has labels the data has not: {extra[:5]}")
    if len(np.unique(yr)) != len(classes):
        raise UserError(f"the clean reference must hold every one of the data's {len(classes)} classes")
    if len(yr) < MIN_PER_CLASS * len(classes):
        raise UserError(f"the clean reference needs at least {MIN_PER_CLASS} images per class on average, got "
                        f"{len(yr)} for {len(classes)} classes")
    return xr, np.searchsorted(classes, yr)
