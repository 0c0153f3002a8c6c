"""Argument helpers shared by the sub-commands (so every command spells a flag the same way).

Choices come from the registries (methods, presets, executors), never from lists written here. Method
parameters become flags from the chosen method's ``PARAMS`` table: ``unpoison purify --method jpeg --help``
shows JPEG's parameters with their real defaults (per preset where a preset sets them).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping
from typing import Any

from ..errors import UserError
from ..params import Param, parse_bool
from ..presets import PresetTable, choose, common_choices


def add_device_seed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads on CPU (default: OMP_NUM_THREADS if set, else the cores not busy with "
                        "other work, at least 1)")


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


# --- presets -------------------------------------------------------------------------------------------------
def preset_help(tables: list[PresetTable]) -> str:
    """``--preset`` help naming what it sizes (every family the command runs)."""
    what = "; ".join(f"{t.family}: {t.help}" for t in tables if t.help)
    return (f"auto (default): paper on CUDA, cpu on CPU. One preset sizes everything the command runs ({what})"
            .replace("%", "%%"))


def add_preset(p: argparse.ArgumentParser, tables: list[PresetTable], default: str = "auto") -> None:
    """``--preset`` with the choices every one of ``tables`` accepts (read from the preset registry)."""
    p.add_argument("--preset", default=default, choices=common_choices(tables), help=preset_help(tables))


def announce_preset(args: argparse.Namespace, tables: list[PresetTable]) -> str:
    """Resolve ``--preset auto`` once (by ``--device``) and say what was chosen on one line (stdout, so that
    stderr keeps the promise of one line per error)."""
    name, line = choose(args.preset, getattr(args, "device", "auto"))
    for t in tables:
        t.resolve(name)  # an alias every family must understand; an error here is a bug in the choices
    if line:
        print(f"unpoison {args.command}: {line}", flush=True)
    return name


# --- method parameters as flags ------------------------------------------------------------------------------
def peek(argv: list[str] | None, flag: str) -> str | None:
    """The value given to ``flag`` in ``argv`` (``--flag V`` or ``--flag=V``), before argparse runs."""
    argv = sys.argv[1:] if argv is None else argv
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _bool(s: str) -> bool:
    try:
        return parse_bool(s, "the value")
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_method_flags(p: argparse.ArgumentParser, params: Mapping[str, Param], defaults: dict[str, str],
                     skip: set[str], title: str) -> None:
    """One ``--key`` flag (dest ``param_key``, default None = the method's own) per :class:`Param` of
    ``params``, its help ending with its range and the real default from ``defaults``."""
    g = p.add_argument_group(title)
    for key, prm in sorted(params.items()):
        if key in skip:
            continue
        typ = prm.type
        text = re.sub(r"\s*\(default[^)]*\)\s*$", "", prm.help)
        rng = prm.range_text()
        text = f"{text}{'; ' + rng if rng else ''} (default: {defaults.get(key, 'None')})".replace("%", "%%")
        kw: dict[str, Any] = {"default": None, "help": text}
        if typ is bool:
            kw.update(type=_bool, metavar="BOOL")
        else:
            kw.update(type=typ if typ in (int, float, str) else str, metavar=key.upper())
        g.add_argument("--" + key.replace("_", "-"), dest=f"param_{key}", **kw)


def given_params(args: argparse.Namespace, known: Mapping[str, Any] | None = None, owner: str = "") -> dict[str, Any]:
    """The method parameters the user set on the command line (``param_*`` not None); with ``known``, a
    parameter ``owner`` (``--attack em``) does not take is refused (flags generated for another method, e.g.
    the method flag given twice)."""
    given = {k[6:]: v for k, v in vars(args).items() if k.startswith("param_") and v is not None}
    unused = sorted(set(given) - set(known)) if known is not None else []
    if unused:
        raise UserError(f"{owner} takes no {', '.join('--' + u.replace('_', '-') for u in unused)}")
    return given
