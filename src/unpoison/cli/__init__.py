"""``unpoison`` command line: a thin layer over the Python API.

Each sub-command lives in its own module exposing ``add_parser(subparsers)`` and ``run(args)``.
A :class:`~unpoison.errors.UserError` anywhere ends the program with one line on stderr and exit
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from .. import __version__
from ..errors import UserError

#: sub-command name -> module (in help order)
COMMANDS = {
    "demo": "demo",
    "info": "info",
    "evaluate": "evaluate",
    "poison": "poison",
    "purify": "purify",
    "train-diffusion": "diffusion",
    "detect": "detect",
    "bench": "bench",
    "report": "report",
    "list": "listing",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unpoison",
        description="Make availability-poisoned image datasets learnable again (D-VAE purification).",
    )
    p.add_argument("--version", action="version", version=f"unpoison {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, mod in COMMANDS.items():
        import_module(f"{__name__}.{mod}").add_parser(sub, name)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"unpoison {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unpoison {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
