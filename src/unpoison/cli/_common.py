"""Argument helpers shared by the sub-commands (so every command spells a flag the same way)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_device_seed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (only one unpoison wrote: a dataset or folder it marked)")


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default=None,
                   help="output format (npz, imagefolder, idx, npy, cifar10, ...); default: the input's")


def add_memory_budget(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="memory a split may take resident (2G, 512M); larger splits stream from disk "
                        "(default: half the free memory of the device)")


def param_flags(registry: Any, skip: set[str]) -> dict[str, tuple[type, str]]:
    """Union of the ``PARAMS`` tables of a registry's entries: name -> (type, help naming each user).

    Attacks and purifiers declare their method parameters once (``PARAMS = {name: (type, default, help)}``);
    the CLI turns them into flags, so a new method needs no CLI code.
    """
    flags: dict[str, tuple[type, list[str], str]] = {}
    for name in registry:
        for key, (typ, default, help_) in registry.get(name).PARAMS.items():
            if key in skip:
                continue
            t, users, h = flags.get(key, (typ, [], help_))
            users.append(f"{name}: {default:.4g}" if isinstance(default, float) else f"{name}: {default}")
            flags[key] = (t, users, h)
    # argparse %-formats help strings: escape literal percent signs
    return {k: (t, f"{h} ({'; '.join(u)})".replace("%", "%%")) for k, (t, u, h) in flags.items()}


def add_param_flags(p: argparse.ArgumentParser, flags: dict[str, tuple[type, str]]) -> None:
    """Add ``--key`` flags (dest ``param_key``, default None) for :func:`param_flags`' output."""
    for key, (typ, help_) in sorted(flags.items()):
        kw: dict[str, Any] = {"default": None, "help": help_}
        if typ is bool:
            kw["type"] = lambda s: s.lower() in ("1", "true", "yes", "on")
            kw["metavar"] = "BOOL"
        else:
            kw["type"] = typ
            kw["metavar"] = key.upper()
        p.add_argument("--" + key.replace("_", "-"), dest=f"param_{key}", **kw)


def given_params(args: argparse.Namespace) -> dict[str, Any]:
    """The method parameters the user set on the command line (``param_*`` not None)."""
    return {k[6:]: v for k, v in vars(args).items() if k.startswith("param_") and v is not None}


def report_dir(output: str | Path) -> Path:
    """``OUT.report/``: the folder beside a dataset output that holds its manifest, grid and arrays."""
    out = Path(output).expanduser()
    return out.with_name(out.name + ".report")


def check_dataset_output(output: str | Path, input_spec: str, overwrite: bool, ds: Any = None,
                         fmt: str | None = None) -> None:
    """Refuse a dataset OUT (and its report folder) before any work: see :mod:`unpoison.outputs`.

    Called once before loading (existence, OUT = IN) and once after (``ds`` known: the output's
    kind, file or folder, and the input's resolved location).
    """
    from ..data import output_format, spec_path
    from ..errors import UserError
    from ..outputs import check_output, guard_inputs

    inputs = [spec_path(input_spec)] + ([ds.source] if ds is not None else [])
    is_dir = output_format(ds, output, fmt).writes_dir if ds is not None else None
    check_output(output, inputs=inputs, overwrite=overwrite, is_dir=is_dir)
    rdir = report_dir(output)
    guard_inputs(rdir, inputs)
    if rdir.exists() and not rdir.is_dir():
        raise UserError("exists and is not a folder (the report folder of the output)", rdir)
