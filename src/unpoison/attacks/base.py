"""The attack interface: bounded availability poisons with bounds verified on the stored uint8 result.

An :class:`Attack` is configured in ``__init__`` (bound, seed, device, method parameters) and applied
by :meth:`Attack.poison`, which picks the exact random fraction to poison (``round(ratio * N)``),
lets the subclass craft float perturbations for those images, rounds the result to uint8, and then
*checks the bound on what will be stored* (per image) so a broken bound can never reach a file:

* ``linf``: ``max |x' - x| <= eps + 0.5/255``;
* ``l2``:   ``||x' - x||_2 <= eps + sqrt(d) * 0.5/255`` (``d = H*W*C``, pixels in [0, 1]);
* ``l0``:   at most ``eps`` pixel positions (all channels of a position count once) change.

Bounds are given in [0, 1] pixel units (``8/255``). ``eps=None`` is the paper's default bound. l2
bounds are quoted at CIFAR size (d = 3072) and scaled by ``sqrt(d / 3072)`` for other sizes so the
per-pixel energy matches (docs/design.md, "Datasets that are not CIFAR"): Fashion-MNIST's default 1.0
becomes ~0.505. ``scale_eps=False`` takes an l2 bound literally. ``info["eps"]`` is the enforced
number; ``info["eps_nominal"]`` the one asked for.

With ``ratio < 1`` the attack only sees (and crafts noise for) the images it poisons.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import pkgutil
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from .. import models
from .. import rng as rng_module
from .._registry import Registry
from .._validate import as_labels, as_uint8_nhwc
from ..errors import NonFiniteError, UserError, check_seed
from ..params import Param, check_params, defaults, unknown
from ..presets import PRESET_TABLES, PresetTable, register_presets, show_value
from ..tensors import pick_device, rng_scope

#: ``unpoison.models`` submodules no surrogate is built from (the purification auto-encoders): editing them
#: leaves the cached poisons valid
_NOT_SURROGATE_MODULES = frozenset({"dvae"})

NORMS = ("linf", "l2", "l0")
#: rounding to uint8 moves each value by at most half a grey level
HALF_LEVEL = 0.5 / 255


@dataclass
class PoisonResult:
    """Poisoned images (uint8, same shape as the input), the integer perturbation, and the record."""

    x: np.ndarray
    delta: np.ndarray
    indices: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


def as_label_array(y: np.ndarray | torch.Tensor, n: int) -> np.ndarray:
    out = as_labels(y, n, "labels")
    if out is None:
        raise UserError("an attack needs labels")
    return out


def check_eps(norm: str, eps: float, d: int, hw: int) -> None:
    """A bound must be positive and meaningful for its norm; else a one-line :class:`UserError`."""
    if norm not in NORMS:
        raise unknown("norm", norm, NORMS)
    if not math.isfinite(eps) or eps <= 0:
        raise UserError(f"bound must be > 0, got {eps}")
    if norm == "linf" and eps > 1:
        raise UserError(f"l_inf bound must be in (0, 1] (pixels are in [0, 1]; write 8/255), got {eps}")
    if norm == "l2" and eps > math.sqrt(d):
        raise UserError(f"l2 bound {eps} exceeds the largest possible change sqrt(d) = {math.sqrt(d):.2f}")
    if norm == "l0" and (eps != int(eps) or eps > hw):
        raise UserError(f"l0 bound must be a whole number of pixels in [1, {hw}], got {eps}")


def scaled_eps(norm: str, eps: float, image_shape: tuple[int, int, int], scale: bool = True) -> float:
    """The enforced bound for images of ``image_shape`` (H, W, C): l2 bounds are quoted at CIFAR size and
    scaled by ``sqrt(d / 3072)`` (unless ``scale`` is False); l_inf and l0 are taken as given."""
    h, w, c = image_shape
    return eps * math.sqrt(h * w * c / 3072) if norm == "l2" and scale else eps


def choose_indices(n: int, ratio: float, seed: int) -> np.ndarray:
    """Exactly ``round(ratio * n)`` distinct indices, random but fixed by ``seed`` (sorted)."""
    if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise UserError(f"ratio must be in (0, 1], got {ratio}")
    k = int(round(ratio * n))
    if k == 0:
        raise UserError(f"ratio {ratio} of {n} images poisons none; use a larger ratio")
    if k == n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, 0x5E1EC7])
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)


def bound_stats(delta: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image l_inf, l2 (in [0, 1] units) and l0 (changed pixel positions) of an int delta NHWC."""
    d = delta.reshape(len(delta), -1, delta.shape[-1]).astype(np.float64) / 255.0
    return {
        "linf": np.abs(d).reshape(len(d), -1).max(1) if d.size else np.zeros(len(d)),
        "l2": np.sqrt((d**2).reshape(len(d), -1).sum(1)),
        "l0": (np.abs(d).max(2) > 0).sum(1),
    }


def verify_bound(delta: np.ndarray, norm: str, eps: float) -> dict[str, float]:
    """Raise ``ValueError`` (a bug, not user input) if any image breaks the bound after rounding."""
    st = bound_stats(delta)
    d = int(np.prod(delta.shape[1:]))
    if norm == "linf":
        limit = eps + HALF_LEVEL + 1e-9
    elif norm == "l2":
        limit = eps + math.sqrt(d) * HALF_LEVEL + 1e-9
    else:
        limit = eps + 1e-9
    worst = int(np.argmax(st[norm])) if len(delta) else 0
    if len(delta) and st[norm][worst] > limit:
        raise ValueError(f"bound broken: image {worst} has {norm} {st[norm][worst]:.6f} > {limit:.6f}")
    return {"max_linf": float(st["linf"].max(initial=0)), "max_l2": float(st["l2"].max(initial=0)),
            "mean_l2": float(st["l2"].mean()) if len(delta) else 0.0,
            "max_l0": int(st["l0"].max(initial=0)), "limit": float(limit)}


def to_float_nchw(x: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(device).permute(0, 3, 1, 2).float().div_(255)


def project(delta: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project a float NCHW perturbation onto the per-image ``norm`` ball of radius ``eps``."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    if norm == "l2":
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        return delta * (eps / n).clamp(max=1.0).view(-1, *([1] * (delta.dim() - 1)))
    raise ValueError(f"no projection for {norm}")


def fit_l2_after_clip(x: np.ndarray, noise: torch.Tensor, eps: float, iters: int = 40) -> torch.Tensor:
    """Scale each image's ``noise`` (float NCHW) so that the *clipped* change ``clip(x + s n) - x`` has l2 ``eps``.

    Scaling before clipping wastes budget wherever pixels sit at 0 or 1: on Fashion-MNIST about half
    the pixels are exactly black, so a zero-mean pattern loses ~17% of its norm (mean l2 0.42 of 0.505)
    and its negative half in the background. ``||clip(x + s n) - x||`` is non-decreasing in ``s``, so a
    per-image bisection finds the largest usable scale (capped where saturation stops further growth).
    Returns the clipped float NCHW change, l2 <= ``eps`` per image.
    """
    xt = to_float_nchw(x, noise.device).double()
    n = noise.double()
    nn_ = n.flatten(1).norm(dim=1).clamp_min(1e-12)
    lo = torch.zeros_like(nn_)
    hi = (eps / nn_) * 64.0  # far past the point where clipping could leave the norm below eps
    view = (-1,) + (1,) * (n.dim() - 1)

    def norm_at(s: torch.Tensor) -> torch.Tensor:
        return ((xt + s.view(view) * n).clamp(0, 1) - xt).flatten(1).norm(dim=1)

    for _ in range(iters):
        mid = (lo + hi) / 2
        ok = norm_at(mid) <= eps
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    return ((xt + lo.view(view) * n).clamp(0, 1) - xt).float()


def quantize(x: torch.Tensor | np.ndarray, delta: torch.Tensor | np.ndarray, norm: str, eps: float) -> np.ndarray:
    """Clean uint8 NHWC ``x`` plus float NCHW/NHWC ``delta`` (0..1 units) -> poisoned uint8 NHWC.

    For l_inf the perturbation is rounded to whole grey levels first (``|q| <= round(255 eps)``) so
    ``eps = 8/255`` means at most 8 levels; otherwise the sum is rounded.
    """
    xn = np.asarray(x).astype(np.float64)
    dn = delta.detach().cpu().numpy() if isinstance(delta, torch.Tensor) else np.asarray(delta)
    if dn.shape != xn.shape:
        dn = dn.transpose(0, 2, 3, 1)
    dn = dn.astype(np.float64) * 255.0
    if norm == "linf":
        lim = math.floor(eps * 255 + 0.5)
        out = xn + np.clip(np.rint(dn), -lim, lim)
    else:
        out = np.rint(xn + dn)
    return np.clip(out, 0, 255).astype(np.uint8)


def _check_finite_output(name: str, out: np.ndarray | torch.Tensor) -> None:
    finite = bool(torch.isfinite(out).all()) if isinstance(out, torch.Tensor) else bool(np.isfinite(out).all())
    if not finite:
        raise NonFiniteError(f"attack {name} produced a non-finite perturbation (NaN/inf); nothing was written "
                             "(a smaller --lr may help)")


class Attack:
    """Base class. Subclasses set the class attributes and implement :meth:`_craft`.

    ``_craft(x, y, num_classes)`` gets the uint8 NHWC images to poison and their labels and returns
    the poisoned images as uint8 NHWC (use :func:`quantize`) or a float NCHW perturbation in [0, 1]
    units; :meth:`poison` checks the bound either way.
    """

    name: ClassVar[str] = ""
    #: the norm of the original work and the norms this implementation can craft in
    norm: ClassVar[str] = "linf"
    norms: ClassVar[tuple[str, ...]] = ("linf",)
    #: default bound per norm (l2 at CIFAR size)
    default_eps: ClassVar[dict[str, float]] = {"linf": 8 / 255}
    #: method parameters: name -> (type, default, help); defaults are the paper's ("paper" preset)
    PARAMS: ClassVar[dict[str, Param]] = {}
    #: preset name -> parameter overrides ("paper" is PARAMS' defaults)
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"paper": {}, "cpu": {}}
    #: the smallest settings (preset and parameters) that still run every code path: what the contract test
    #: (tests/test_contract.py) and quick checks build it with
    SMOKE: ClassVar[dict[str, Any]] = {}
    uses_surrogate: ClassVar[bool] = False
    supports_checkpoint: ClassVar[bool] = False

    def __init__(self, eps: float | None = None, seed: int = 0, device: str | torch.device = "auto",
                 progress: bool = True, norm: str | None = None, preset: str = "paper",
                 scale_eps: bool = True, checkpoint_dir: str | None = None, resume: bool = False,
                 **params: Any) -> None:
        self.norm_used = norm or self.norm
        if self.norm_used not in self.norms:
            raise UserError(f"attack {self.name} crafts in {'/'.join(self.norms)}, not {self.norm_used}")
        preset = self.presets().resolve(preset, device)
        owner = f"attack {self.name}"
        given = check_params(params, self.PARAMS, owner)
        if checkpoint_dir is not None and not self.supports_checkpoint:
            checkpoint_dir = None  # nothing worth resuming (seconds of work)
        self.eps_nominal = float(self.default_eps[self.norm_used] if eps is None else eps)
        if self.norm_used == "l0":
            check_eps("l0", self.eps_nominal, 1, 10**9)
        elif not math.isfinite(self.eps_nominal) or self.eps_nominal <= 0:
            raise UserError(f"bound must be > 0, got {self.eps_nominal}")
        elif self.norm_used == "linf" and self.eps_nominal > 1:
            check_eps("linf", self.eps_nominal, 1, 1)
        self.seed = check_seed(seed, "seed")
        self.device = device  # as given ("auto", "cuda:1"); the device a run uses is ``device_``
        self.progress = progress
        self.preset = preset
        self.scale_eps = scale_eps
        self.checkpoint_dir = checkpoint_dir
        self.resume = resume
        merged = defaults(self.PARAMS)
        merged.update({k: self.PARAMS[k].coerce(v, k, owner) for k, v in self.PRESETS[preset].items()})
        merged.update({k: v for k, v in given.items() if v is not None})
        self.params = merged
        self.check_params()
        #: set by :meth:`poison` for the run in progress: the enforced bound and the device used
        self.eps_: float = self.eps_nominal
        self.device_: torch.device = torch.device("cpu")
        self.info_: dict[str, Any] = {}

    def check_params(self) -> None:
        """Validate ``self.params`` beyond their types (no I/O); subclasses extend it."""

    @classmethod
    def presets(cls) -> PresetTable:
        """This attack's preset table (registered by :func:`register_attack`; built on the fly for a class
        used without registering it)."""
        family = f"attack {cls.name}"
        return PRESET_TABLES.get(family) if family in PRESET_TABLES else _preset_table(cls)

    @classmethod
    def code_modules(cls) -> list[str]:
        """The unpoison modules whose source keys this attack's cached poisons: those its class is built from,
        the tensor and RNG helpers, and for a surrogate attack the classifiers' modules (every
        ``unpoison.models`` submodule but the purification auto-encoders', listed from the package itself so
        the key does not depend on what else happens to be imported)."""
        mods = [k.__module__ for k in cls.__mro__ if k.__module__.startswith("unpoison.")]
        mods += [rng_scope.__module__, rng_module.__name__]
        if cls.uses_surrogate:
            mods += [f"{models.__name__}.{m.name}" for m in sorted(pkgutil.iter_modules(models.__path__),
                                                                   key=lambda m: m.name)
                     if m.name not in _NOT_SURROGATE_MODULES]
        return list(dict.fromkeys(mods))

    @classmethod
    def code_version(cls) -> str:
        """A short hash of the source of :meth:`code_modules`: a cached poison is reused only by the code that
        made it."""
        h = hashlib.sha256()
        for name in cls.code_modules():
            h.update(name.encode())
            h.update(inspect.getsource(importlib.import_module(name)).encode())
        return h.hexdigest()[:16]

    # --- helpers for subclasses -------------------------------------------------------------------
    def effective_eps(self, image_shape: tuple[int, ...]) -> float:
        h, w, c = image_shape
        return scaled_eps(self.norm_used, self.eps_nominal, (h, w, c), self.scale_eps)

    def get_params(self) -> dict[str, Any]:
        return {"norm": self.norm_used, "eps": self.eps_nominal, "preset": self.preset, **self.params}

    @classmethod
    def param_defaults(cls) -> dict[str, str]:
        """Each parameter's default as ``--help`` shows it: per preset where the presets differ."""
        show = show_value
        out = {}
        for k, prm in cls.PARAMS.items():
            vals = {p: over.get(k, prm.default) for p, over in cls.PRESETS.items()}
            same = len({repr(v) for v in vals.values()}) == 1
            out[k] = show(prm.default) if same else ", ".join(f"{p} {show(v)}" for p, v in vals.items())
        return out

    # --- the one entry point ---------------------------------------------------------------------
    def poison(self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, ratio: float = 1.0) -> PoisonResult:
        """Poison ``round(ratio * N)`` random images of ``x`` (labels ``y``); verify the bound per image."""
        t0 = time.perf_counter()
        x = as_uint8_nhwc(x)
        y = as_label_array(y, len(x))
        num_classes = int(y.max()) + 1
        if len(np.unique(y)) < 2:
            raise UserError("poisoning needs at least 2 classes; the labels have one")
        h, w, c = x.shape[1:]
        eps = self.effective_eps((h, w, c))
        check_eps(self.norm_used, eps, h * w * c, h * w)
        idx = choose_indices(len(x), ratio, self.seed)
        self.eps_, self.device_ = eps, pick_device(self.device)
        self.info_ = {}
        xs, ys = x[idx], y[idx]
        t1 = time.perf_counter()
        with rng_scope(self.seed, self.device_):  # weight init of surrogates; every other draw has a generator
            out = self._craft(xs, ys, num_classes)
        t2 = time.perf_counter()
        if isinstance(out, torch.Tensor) or out.dtype != np.uint8:
            _check_finite_output(self.name, out)  # NaN would round to a silent, in-bound garbage result
            out = quantize(xs, out, self.norm_used, eps)
        if out.shape != xs.shape:
            raise ValueError(f"{self.name} returned shape {out.shape} for {xs.shape}")
        d_sub = out.astype(np.int16) - xs.astype(np.int16)
        checked = verify_bound(d_sub, self.norm_used, eps)
        x_out = x.copy()
        x_out[idx] = out
        delta = np.zeros(x.shape, dtype=np.int16)
        delta[idx] = d_sub
        h_, w_, c_ = x.shape[1:]
        info: dict[str, Any] = {
            "attack": self.name,
            "norm": self.norm_used,
            "eps": eps,
            "eps_nominal": self.eps_nominal,
            "eps_levels": eps * 255 if self.norm_used == "linf" else None,
            "eps_scaled_by": eps / self.eps_nominal,
            "image_shape_hwc": [h_, w_, c_],
            "params": self.get_params(),
            "seed": self.seed,
            "device": str(self.device_),
            "ratio": ratio,
            "n_poisoned": int(len(idx)),
            "n_total": int(len(x)),
            "bound_check": checked,
            **self.info_,
            "timings_s": {"craft": t2 - t1, "total": time.perf_counter() - t0},
        }
        return PoisonResult(x=x_out, delta=delta, indices=idx, info=info)

    def _craft(self, x: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray | torch.Tensor:
        raise NotImplementedError


ATTACKS: Registry[type[Attack]] = Registry("attack")


def _preset_table(cls: type[Attack]) -> PresetTable:
    return PresetTable(f"attack {cls.name}", cls.PRESETS, keys=frozenset(cls.PARAMS),
                       aliases={"smoke": "cpu"} if "cpu" in cls.PRESETS else {}, help=f"{cls.name}'s method parameters")


def register_attack(name: str, help: str = "") -> Any:  # noqa: A002
    """Class decorator: register it in :data:`ATTACKS` (which sets ``cls.name``) with its preset table."""

    def deco(cls: type[Attack]) -> type[Attack]:
        ATTACKS.register(name, help)(cls)
        register_presets(_preset_table(cls))
        return cls

    return deco


def make_attack(name: str, eps: float | None = None, seed: int = 0, device: str | torch.device = "auto",
                progress: bool = True, **params: Any) -> Attack:
    """Build a registered attack; ``eps=None`` is the paper's bound for it (see module doc)."""
    return ATTACKS.get(name)(eps=eps, seed=seed, device=device, progress=progress, **params)


def apply_perturbation(x: np.ndarray, pert: np.ndarray, norm: str, eps: float, ratio: float = 1.0,
                       seed: int = 0, source: str = "perturbation") -> PoisonResult:
    """Add a released perturbation to clean images and verify the bound.

    ``pert`` is N x H x W x C or N x C x H x W (or one H x W x C / C x H x W pattern broadcast to all):
    a floating array is in [-1, 1] pixel units (``8/255`` = 8 grey levels); an integer array is in
    grey levels (-255..255). ``eps`` is the enforced bound in [0, 1] units (pixels for l0).
    """
    x = as_uint8_nhwc(x)
    n, h, w, c = x.shape
    p = np.asarray(pert)
    if p.ndim == 3:
        p = np.broadcast_to(p[None], (n, *p.shape))
    if p.ndim != 4 or p.shape[0] != n:
        raise UserError(f"perturbation has shape {p.shape}; expected {n} x {h} x {w} x {c} (or N x C x H x W)",
                        source)
    if p.shape[1:] == (h, w, c):
        pass
    elif p.shape[1:] == (c, h, w):
        p = p.transpose(0, 2, 3, 1)
    else:
        raise UserError(f"perturbation has shape {p.shape}; expected {n} x {h} x {w} x {c} (or N x C x H x W)",
                        source)
    if np.issubdtype(p.dtype, np.integer) or p.dtype == np.bool_:
        levels = p.astype(np.float64)
    elif np.issubdtype(p.dtype, np.floating):
        if not np.isfinite(p).all() or np.abs(p).max() > 1:
            raise UserError("a float perturbation must be finite and in [-1, 1] pixel units", source)
        levels = p.astype(np.float64) * 255.0
    else:
        raise UserError(f"perturbation dtype {p.dtype} is not numeric", source)
    check_eps(norm, eps, h * w * c, h * w)
    idx = choose_indices(n, ratio, seed)
    out = np.clip(np.rint(x[idx].astype(np.float64) + levels[idx]), 0, 255).astype(np.uint8)
    d_sub = out.astype(np.int16) - x[idx].astype(np.int16)
    try:
        checked = verify_bound(d_sub, norm, eps)
    except ValueError as e:
        raise UserError(f"perturbation breaks the {norm} bound {eps:.6g}: {e}", source) from None
    x_out = x.copy()
    x_out[idx] = out
    delta = np.zeros(x.shape, dtype=np.int16)
    delta[idx] = d_sub
    info = {"attack": "from-perturbation", "source": source, "norm": norm, "eps": eps, "ratio": ratio,
            "seed": seed, "n_poisoned": int(len(idx)), "n_total": int(n), "bound_check": checked}
    return PoisonResult(x=x_out, delta=delta, indices=idx, info=info)
