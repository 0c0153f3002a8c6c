"""``unpoison`` command line: a thin layer over the Python API.

Each sub-command lives in its own module exposing ``add_parser(subparsers, name, argv)`` and ``run(args)``;
``argv`` lets a command show the flags of the method it was given (``purify --method jpeg --help``).
A :class:`~unpoison.errors.UserError` anywhere ends the program with one line on stderr and exit
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from importlib import import_module

from .. import __version__
from ..errors import UserError, check_seed, run_guarded
from ..threads import apply_threads

#: sub-command name -> module (in help order)
COMMANDS = {
    "demo": "demo",
    "info": "info",
    "evaluate": "evaluate",
    "poison": "poison",
    "purify": "purify",
    "train-diffusion": "diffusion",
    "scan": "scan",
    "detect": "detect",
    "bench": "bench",
    "report": "report",
    "list": "listing",
}


#: reStructuredText in docstrings and Param help: ``x``, :role:`x` / :role:`~a.b.x`, a closing ``::``
_RST = re.compile(r"``((?s:.+?))``|:[a-z]+:`(~?)([^`]+)`|::(?=\s*$)", re.M)


def plain(text: str) -> str:
    """Help text for a terminal: the reStructuredText markup of the docstrings it comes from dropped."""
    def one(m: re.Match[str]) -> str:
        if m.group(1) is not None:
            return m.group(1)
        if m.group(3) is not None:
            return m.group(3).rsplit(".", 1)[-1] if m.group(2) else m.group(3)
        return ":"

    return _RST.sub(one, text)


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (a :class:`UserError`), like every other bad input, and its help
    as plain text (every sub-command's parser is one of these)."""

    def format_help(self) -> str:
        return plain(super().format_help())

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments"):
            message += (" (method parameters follow the method: 'unpoison purify --method NAME --help', "
                        "'unpoison poison --attack NAME --help', 'unpoison evaluate --train-defense NAME --help')")
        raise UserError(message)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    p = _Parser(
        prog="unpoison",
        description="Make availability-poisoned image datasets learnable again (D-VAE purification).",
    )
    p.add_argument("--version", action="version", version=f"unpoison {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, mod in COMMANDS.items():
        import_module(f"{__name__}.{mod}").add_parser(sub, name, argv)
    return p


def check_args(args: argparse.Namespace) -> None:
    """Checks every command shares: float flags finite (``--lr inf``, ``--kld-limit1 nan``), seeds in range."""
    for key, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            flag = "--" + (key[6:] if key.startswith("param_") else key).replace("_", "-")
            raise UserError(f"{flag} must be a finite number, got {value}")
    if getattr(args, "seed", None) is not None:
        check_seed(args.seed)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if a in COMMANDS), None)
    prefix = f"unpoison {command}" if command else "unpoison"

    def go() -> int:
        args = build_parser(argv).parse_args(argv)
        args.argv = list(argv)
        check_args(args)
        if hasattr(args, "threads"):  # a command that computes: as many threads as cores are free
            args.threads = apply_threads(args.threads)
        return int(args.func(args) or 0)

    return run_guarded(prefix, go)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
