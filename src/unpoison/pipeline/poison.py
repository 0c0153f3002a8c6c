"""``poison_dataset``: craft (or add a released) availability poison on a training split, bound verified on
the stored uint8 images; and :func:`write_poison_outputs`, the ``poison`` command's dataset and report."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..attacks import ATTACKS, PoisonResult, apply_perturbation, make_attack
from ..attacks.base import check_eps, scaled_eps
from ..data import ImageDataset, save_dataset
from ..data.perturbation import load_perturbation
from ..errors import UserError
from ..utils import Timer, manifest, psnr, save_npy_atomic, write_json
from ..viz import residual_image, save_image_grid

#: default bound per norm when no attack names one
DEFAULT_EPS = {"linf": 8 / 255, "l2": 1.0, "l0": 1.0}


def poison_dataset(ds: ImageDataset, attack: str | None = None, params: dict[str, Any] | None = None, *,
                   eps: float | None = None, norm: str | None = None, ratio: float = 1.0, seed: int = 0,
                   device: Any = "auto", progress: bool = True, preset: str = "paper", scale_eps: bool = True,
                   checkpoint_dir: str | Path | None = None, resume: bool = False,
                   perturbation: np.ndarray | str | Path | None = None, source: str = "perturbation",
                   timer: Timer | None = None) -> PoisonResult:
    """Poison ``round(ratio * N)`` images of ``ds``'s training split with ``attack`` (its ``params``), or add a
    released ``perturbation`` (an array, or a ``.npy`` / ``.pt`` file read by
    :func:`unpoison.data.perturbation.load_perturbation`; ``attack`` then only names the default bound).
    The result's ``info`` records the bound, the check on the stored images, the parameters and the timings."""
    timer = timer or Timer()
    if len(np.unique(ds.y_train)) < 2:
        raise UserError("poisoning needs at least 2 classes; the training split has one", ds.source)
    cls = ATTACKS.get(attack) if attack else None
    if perturbation is not None:
        if params or resume:
            raise UserError("--from-perturbation takes no attack parameters or --resume")
        norm = norm or (cls.norm if cls else "linf")
        nominal = eps if eps is not None else (
            cls.default_eps.get(norm) if cls and norm in cls.default_eps else DEFAULT_EPS[norm])
        if not math.isfinite(nominal) or nominal <= 0:
            raise UserError(f"bound must be > 0, got {nominal}")
        h, w, c = ds.image_shape
        bound = scaled_eps(norm, nominal, (h, w, c), scale_eps)
        check_eps(norm, bound, h * w * c, h * w)
        if not isinstance(perturbation, np.ndarray):
            source = str(perturbation)
            perturbation = load_perturbation(perturbation)
        with timer("poison"):
            res = apply_perturbation(ds.x_train, perturbation, norm, bound, ratio, seed, source=source)
        res.info.update({"eps_nominal": nominal, "attack_defaults_from": attack})
        return res
    if cls is None:
        raise UserError("give --attack NAME or --from-perturbation FILE")
    kw: dict[str, Any] = dict(params or {})
    if cls.supports_checkpoint:
        kw.update(checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir), resume=resume)
    elif resume:
        raise UserError(f"--attack {attack} has nothing to resume (it does not checkpoint)")
    atk = make_attack(attack, eps=eps, seed=seed, device=device, progress=progress, norm=norm, preset=preset,
                      scale_eps=scale_eps, **kw)
    with timer("poison"):
        try:
            return atk.poison(ds.x_train, ds.y_train, ratio)
        except ValueError as e:
            if isinstance(e, UserError):
                raise
            raise RuntimeError(f"refusing to write: {e}") from e


def write_poison_outputs(ds: ImageDataset, res: PoisonResult, output: str | Path, rdir: Path, name: str,
                         config: dict[str, Any], seed: int, timer: Timer, fmt: str | None = None,
                         overwrite: bool = False) -> float:
    """OUT (atomically), and beside it ``perturbation.npy``, ``grid.png`` and the manifest; returns the PSNR of
    the poisoned images to the clean ones."""
    with timer("write"):
        save_dataset(ds.replace(x_train=res.x), output, fmt, overwrite=overwrite)
        save_npy_atomic(rdir / "perturbation.npy", res.delta)
    folder = rdir / "checkpoints"  # the run finished: nothing to resume (only this attack's file goes)
    (folder / f"{name}.pt").unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()
    p = psnr(ds.x_train[res.indices], res.x[res.indices])
    show = res.indices[:8]
    save_image_grid({"clean": ds.x_train[show], "poisoned": res.x[show],
                     "perturbation (amplified)": residual_image(res.x[show], ds.x_train[show])},
                    rdir / "grid.png", title=f"{name}: {res.info.get('norm')} {res.info.get('eps', 0):.4g}, "
                                             f"PSNR {p:.2f} dB")
    cfg = {"attack": name, **config, "format": fmt or ds.format, "ratio": res.info.get("ratio"),
           "preset": res.info.get("params", {}).get("preset")}
    info = dict(res.info)
    write_json(rdir / "manifest.json", manifest(
        "poison", cfg, seed, {**timer.times, **{f"attack_{k}": v for k, v in info.pop("timings_s", {}).items()}},
        attack=info, psnr_clean_poisoned=p, indices_poisoned=res.indices.tolist(), n_train=int(len(ds.x_train))))
    return p
