"""``unpoison purify IN OUT --method NAME``: purify a training split, write it and a report.

The training split is purified; the test split is copied unchanged. OUT keeps IN's format unless
``--format`` says otherwise and is written atomically. Beside OUT, ``OUT.report/`` holds
``manifest.json`` (config, versions, seed, timings, PSNR per stage), ``grid.png`` (input / stages /
output / amplified residual) and the purifier's arrays (e.g. D-VAE's stage-1 ``p_hat.npy``).
Method parameters are flags generated from the chosen purifier's ``PARAMS`` table: ``unpoison purify
--method NAME --help`` lists them with their defaults. ``--preset`` (default auto: paper on CUDA, cpu on
CPU) sizes the purifiers that have presets (dvae, vae, ae).
"""

from __future__ import annotations

import argparse
from typing import Any

from ..data import load_dataset, save_dataset
from ..defenses import DEFENSES, make_purifier
from ..defenses.dvae import DVAE_PRESETS
from ..errors import UserError
from ..utils import Timer, manifest, psnr, save_npy_atomic, write_json
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

#: flags handled here, never generated from PARAMS
_COMMON = {"device", "seed", "progress", "checkpoint_dir", "resume", "preset"}
_DEFAULT = "dvae"


def add_parser(sub: argparse._SubParsersAction, name: str, argv: list[str] | None = None) -> None:
    method = peek(argv, "--method")
    method = method if method in DEFENSES else _DEFAULT
    p = sub.add_parser(name, help="purify a (poisoned) training set", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="dataset spec to purify")
    p.add_argument("output", help="where to write the purified dataset")
    p.add_argument("--method", default=_DEFAULT, choices=DEFENSES.names(),
                   help="; ".join(f"{n}: {DEFENSES.help(n)}" for n in DEFENSES.names()).replace("%", "%%"))
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    cls = DEFENSES.get(method)
    add_preset(p, [DVAE_PRESETS])  # methods without presets (jpeg, bdr, ...) have nothing for it to size
    add_format(p)
    add_overwrite(p)
    add_device_seed(p)
    add_quiet(p)
    add_method_flags(p, cls.PARAMS, cls.param_defaults(), _COMMON, f"parameters of --method {method}")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    timer = Timer()
    check_dataset_output(args.output, args.input, args.overwrite)
    with timer("load"):
        ds = load_dataset(args.input)
    check_dataset_output(args.output, args.input, args.overwrite, ds, args.format)
    cls = DEFENSES.get(args.method)
    params: dict[str, Any] = given_params(args)
    unused = sorted(set(params) - set(cls.PARAMS))
    if unused:  # flags were generated for another method than the one parsed (e.g. --method given twice)
        raise UserError(f"--method {args.method} takes no {', '.join('--' + u.replace('_', '-') for u in unused)}")
    preset = announce_preset(args, [DVAE_PRESETS]) if "preset" in cls.COMMON else None
    rdir = report_dir(args.output)
    purifier = make_purifier(args.method, device=args.device, seed=args.seed, progress=not args.quiet,
                             preset=preset, checkpoint_dir=str(rdir / "checkpoints") if cls.supports_checkpoint
                             else None, resume=args.resume, **params)
    with timer("purify"):
        x_out = purifier.fit_purify(ds.x_train, ds.y_train)
    out_ds = ds.replace(x_train=x_out)
    with timer("write"):
        save_dataset(out_ds, args.output, args.format, overwrite=args.overwrite)
    stats = {"psnr_input_output": psnr(ds.x_train, x_out), **purifier.info_}
    for k, arr in purifier.extras_.items():
        save_npy_atomic(rdir / f"{k}.npy", arr)
    rows = {"input": ds.x_train, **purifier.stages_, "output": x_out,
            "residual (amplified)": residual_image(ds.x_train, x_out)}
    save_image_grid(rows, rdir / "grid.png", title=f"{args.method}: PSNR {stats['psnr_input_output']:.2f} dB")
    cfg = {"method": args.method, "params": purifier.get_params(), "input": args.input, "output": args.output,
           "format": args.format or ds.format}
    write_json(rdir / "manifest.json", manifest("purify", cfg, args.seed, timer.times, stats=stats,
                                                 n_train=int(len(ds.x_train))))
    print(f"purified {len(x_out)} images with {args.method}: PSNR(input, output) = "
          f"{stats['psnr_input_output']:.2f} dB; wrote {args.output} and {rdir}/")
    return 0
