"""``unpoison poison IN OUT --attack NAME``: availability-poison a training split, write it and a report.

The training split is poisoned (all of it, or an exact random fraction ``--ratio``: round(ratio*N)
images); the test split is copied unchanged. OUT keeps IN's format unless ``--format`` says otherwise
and is written atomically. ``OUT.report/`` holds ``perturbation.npy`` (int16, poisoned - clean, in
grey levels), ``manifest.json`` (attack, bound, parameters, seed, surrogate accuracy, poisoned
indices, timings) and ``grid.png``.

Bounds: ``--eps`` in [0, 1] pixel units (``8/255``) for linf, per-image l2 quoted at CIFAR size
(scaled by sqrt(d/3072) unless ``--no-scale-eps``), whole pixels for l0. Every bound is checked on
the stored uint8 images; a run that breaks it writes nothing.

Method parameters are flags generated from the chosen attack's ``PARAMS``: ``unpoison poison --attack
NAME --help`` lists them with their defaults per preset. ``--preset`` (default auto: paper on CUDA, cpu
on CPU) sizes the attack (surrogate, rounds, steps).

``--from-perturbation FILE`` adds a released perturbation instead of crafting one: ``.npy``
(loaded with allow_pickle=False) or ``.pt`` (a tensor, torch.load(weights_only=True)); shape
N x H x W x C or N x C x H x W (or one pattern for all); float values are in [-1, 1] pixel units,
integer values in grey levels. ``--norm``/``--eps`` (or ``--attack``'s defaults) give the bound.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..attacks import ATTACKS, PoisonResult, apply_perturbation, make_attack
from ..attacks.base import NORMS, check_eps, scaled_eps
from ..data import load_dataset, save_dataset
from ..data._limits import check_alloc, check_compressed, check_npy_file
from ..errors import UserError
from ..utils import Timer, manifest, parse_fraction, psnr, save_npy_atomic, write_json
from ..viz import residual_image, save_image_grid
from ._common import (
    add_device_seed,
    add_format,
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

#: default bound per norm when no attack names one
_DEFAULT_EPS = {"linf": 8 / 255, "l2": 1.0, "l0": 1.0}


def add_parser(sub: argparse._SubParsersAction, name: str, argv: list[str] | None = None) -> None:
    attack = peek(argv, "--attack")
    p = sub.add_parser(name, help="poison a training set with an availability attack", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="clean dataset spec")
    p.add_argument("output", help="where to write the poisoned dataset")
    p.add_argument("--attack", default=None,
                   help="; ".join(f"{n}: {ATTACKS.help(n)}" for n in ATTACKS.names()).replace("%", "%%"))
    p.add_argument("--eps", default=None, help="bound (default: the paper's for the attack): 8/255, 1.0, 1")
    p.add_argument("--norm", default=None, choices=NORMS, help="norm (default: the attack's)")
    p.add_argument("--no-scale-eps", action="store_true", help="take an l2 bound literally (no sqrt(d/3072))")
    p.add_argument("--ratio", default="1.0", help="fraction of the training split to poison, in (0, 1]")
    tables = [ATTACKS.get(attack).presets()] if attack in ATTACKS else [ATTACKS.get(n).presets() for n in ATTACKS]
    add_preset(p, tables)
    p.add_argument("--resume", action="store_true", help="continue a killed run from OUT.report/checkpoints")
    p.add_argument("--from-perturbation", default=None, metavar="FILE",
                   help="add this released perturbation (.npy/.pt) instead of crafting one")
    add_format(p)
    add_overwrite(p)
    add_device_seed(p)
    add_quiet(p)
    if attack in ATTACKS:
        cls = ATTACKS.get(attack)
        add_method_flags(p, cls.PARAMS, cls.param_defaults(), set(), f"parameters of --attack {attack}")
    p.set_defaults(func=run)


def parse_ratio(text: str) -> float:
    r = parse_fraction(text, "--ratio")
    if not (0 < r <= 1) or not math.isfinite(r):
        raise UserError(f"--ratio must be in (0, 1], got {text}")
    return r


def _check_pt_sizes(path: Path) -> None:
    """A ``.pt`` zip's records may not claim more than they hold (torch allocates a record's claimed size)."""
    check_alloc(path.stat().st_size, "the perturbation file", path)
    if not zipfile.is_zipfile(path):
        return  # legacy format: torch reads it as a stream, bounded by the file
    with zipfile.ZipFile(path) as z:
        total = 0
        for info in z.infolist():
            if info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
                raise UserError(f"record {info.filename!r} claims {info.file_size} bytes but holds "
                                f"{info.compress_size}", path)
            check_compressed(info.file_size, info.compress_size, f"record {info.filename!r}", path)
            total += info.file_size
    check_alloc(total, "the perturbation", path)


def load_perturbation(path: str | Path) -> np.ndarray:
    """A perturbation array from ``.npy`` (no pickles) or ``.pt`` (weights_only); UserError otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError("no such file", path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            check_npy_file(path)  # header vs file size vs budget before numpy allocates the claim
            arr = np.load(path, allow_pickle=False)
        elif suffix in (".pt", ".pth"):
            import torch

            _check_pt_sizes(path)
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:  # torch's own text is a page of advice on weights_only=False
                raise UserError("not a plain tensor file: it holds pickled code or objects that "
                                "torch.load(weights_only=True) refuses to run; save the tensor alone", path) from None
            if isinstance(obj, dict) and len(obj) == 1:
                obj = next(iter(obj.values()))
            if not isinstance(obj, torch.Tensor):
                raise UserError(f"expected a tensor, found {type(obj).__name__}", path)
            arr = obj.float().numpy() if obj.is_floating_point() else obj.numpy()
        else:
            raise UserError("perturbation must be a .npy or .pt file", path)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"cannot read perturbation: {type(e).__name__}: {first}", path) from None
    return np.asarray(arr)


def run(args: argparse.Namespace) -> int:
    timer = Timer()
    ratio = parse_ratio(args.ratio)
    if args.attack is None and args.from_perturbation is None:
        raise UserError("give --attack NAME or --from-perturbation FILE")
    cls = ATTACKS.get(args.attack) if args.attack else None
    given = given_params(args, None if cls is None else cls.PARAMS, f"--attack {args.attack}")
    norm = args.norm or (cls.norm if cls else "linf")
    eps_nominal = parse_fraction(args.eps, "--eps") if args.eps is not None else None
    check_dataset_output(args.output, args.input, args.overwrite)
    with timer("load"):
        ds = load_dataset(args.input)
    check_dataset_output(args.output, args.input, args.overwrite, ds, args.format)
    if len(np.unique(ds.y_train)) < 2:
        raise UserError("poisoning needs at least 2 classes; the training split has one", args.input)
    h, w, c = ds.image_shape
    rdir = report_dir(args.output)

    if args.from_perturbation is not None:
        if given or args.resume:
            raise UserError("--from-perturbation takes no attack parameters or --resume")
        nominal = eps_nominal if eps_nominal is not None else (
            cls.default_eps.get(norm) if cls and norm in cls.default_eps else _DEFAULT_EPS[norm])
        if not math.isfinite(nominal) or nominal <= 0:
            raise UserError(f"bound must be > 0, got {nominal}")
        eps = scaled_eps(norm, nominal, (h, w, c), not args.no_scale_eps)
        check_eps(norm, eps, h * w * c, h * w)
        pert = load_perturbation(args.from_perturbation)
        with timer("poison"):
            res = apply_perturbation(ds.x_train, pert, norm, eps, ratio, args.seed, source=args.from_perturbation)
        res.info.update({"eps_nominal": nominal, "attack_defaults_from": args.attack})
        name = "from-perturbation"
    else:
        assert cls is not None
        params: dict[str, Any] = dict(given)
        if cls.supports_checkpoint:
            params["checkpoint_dir"] = str(rdir / "checkpoints")
            params["resume"] = args.resume
        elif args.resume:
            raise UserError(f"--attack {args.attack} has nothing to resume (it does not checkpoint)")
        attack = make_attack(args.attack, eps=eps_nominal, seed=args.seed, device=args.device,
                             progress=not args.quiet, norm=args.norm, preset=announce_preset(args, [cls.presets()]),
                             scale_eps=not args.no_scale_eps, **params)
        with timer("poison"):
            try:
                res = attack.poison(ds.x_train, ds.y_train, ratio)
            except ValueError as e:
                if isinstance(e, UserError):
                    raise
                raise RuntimeError(f"refusing to write: {e}") from e
        name = args.attack
    write_outputs(args, ds, res, rdir, timer, name)
    return 0


def _drop_checkpoint(folder: Path, name: str) -> None:
    """Remove this attack's checkpoint (only that file; the folder too if that leaves it empty)."""
    (folder / f"{name}.pt").unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


def write_outputs(args: argparse.Namespace, ds: Any, res: PoisonResult, rdir: Path, timer: Timer, name: str) -> None:
    out_ds = ds.replace(x_train=res.x)
    with timer("write"):
        save_dataset(out_ds, args.output, args.format, overwrite=args.overwrite)
        save_npy_atomic(rdir / "perturbation.npy", res.delta)
    _drop_checkpoint(rdir / "checkpoints", name)  # the run finished; nothing to resume
    p = psnr(ds.x_train[res.indices], res.x[res.indices])
    show = res.indices[:8]
    save_image_grid({"clean": ds.x_train[show], "poisoned": res.x[show],
                     "perturbation (amplified)": residual_image(res.x[show], ds.x_train[show])},
                    rdir / "grid.png", title=f"{name}: {res.info.get('norm')} {res.info.get('eps', 0):.4g}, "
                                             f"PSNR {p:.2f} dB")
    cfg = {"attack": name, "input": args.input, "output": args.output, "format": args.format or ds.format,
           "ratio": res.info.get("ratio"), "preset": res.info.get("params", {}).get("preset"),
           "from_perturbation": args.from_perturbation}
    info = dict(res.info)
    write_json(rdir / "manifest.json", manifest(
        "poison", cfg, args.seed, {**timer.times, **{f"attack_{k}": v for k, v in info.pop("timings_s", {}).items()}},
        attack=info, psnr_clean_poisoned=p, indices_poisoned=res.indices.tolist(),
        n_train=int(len(ds.x_train))))
    print(f"poisoned {len(res.indices)}/{len(ds.x_train)} images with {name} ({info.get('norm')} bound "
          f"{info.get('eps', 0):.4g}, max per image {info['bound_check']['max_' + info['norm']]:.4g}); "
          f"PSNR {p:.2f} dB; wrote {args.output} and {rdir}/")
