"""``unpoison train-diffusion DATA OUT.pt``: train the DDPM that the ``avatar`` purifier denoises with.

DATA must be *clean* data of the domain to purify (same image size and channels). OUT.pt is written
atomically (a state_dict plus its JSON config; loaded with ``torch.load(weights_only=True)``) and
``OUT.pt.manifest.json`` records config, seed, timings and the loss per epoch. Presets: ``toy``
(tests, seconds on CPU), ``cpu`` (small Fashion-MNIST runs), ``paper`` (DDPM's CIFAR UNet, GPU);
``auto`` (the default) is paper on CUDA, cpu on CPU.
Then: ``unpoison purify POISONED OUT --method avatar --checkpoint OUT.pt --t-star 100``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import check_file_output, load_dataset
from ..defenses.avatar import DIFFUSION_PRESETS, save_checkpoint, train_diffusion
from ..utils import Timer, manifest, write_json
from ._common import add_device_seed, add_overwrite, add_preset, add_quiet, announce_preset


def add_parser(sub: argparse._SubParsersAction, name: str, argv: list[str] | None = None) -> None:
    p = sub.add_parser(name, help="train the diffusion model used by the avatar purifier", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="clean training data of the target domain (dataset spec)")
    p.add_argument("output", help="checkpoint to write (.pt)")
    add_preset(p, [DIFFUSION_PRESETS])
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    p.add_argument("--batch-size", type=int, default=None, help="override the preset's batch size")
    p.add_argument("--lr", type=float, default=None, help="override the preset's learning rate")
    p.add_argument("--no-flip", action="store_true", help="no horizontal-flip augmentation (digit-like data)")
    add_overwrite(p)
    add_device_seed(p)
    add_quiet(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    preset = announce_preset(args, [DIFFUSION_PRESETS])
    timer = Timer()
    check_file_output(args.output, [args.data], args.overwrite)
    with timer("load"):
        ds = load_dataset(args.data)
    check_file_output(args.output, [args.data], args.overwrite, [ds.source])
    with timer("train"):
        model, cfg, rec = train_diffusion(ds, preset, args.epochs, args.batch_size, args.lr, args.seed,
                                          args.device, progress=not args.quiet, flip=not args.no_flip)
    out = Path(args.output)
    with timer("write"):
        save_checkpoint(out, cfg, model)
    run_cfg = {k: v for k, v in vars(args).items() if k != "func"}
    write_json(out.with_name(out.name + ".manifest.json"),
               manifest("train-diffusion", {**run_cfg, "model": cfg}, args.seed, timer.times, result=rec))
    print(f"trained a {rec['parameters'] / 1e6:.2f}M-parameter diffusion model on {rec['n_train']} images "
          f"({cfg['epochs']} epochs, final loss {rec['history'][-1]['loss']:.4f}); wrote {out}")
    return 0
