"""``unpoison info DATA``: format, shapes, classes, per-class counts, value range."""

from __future__ import annotations

import argparse
import json

from ..data import load_dataset
from ..errors import printable


def add_parser(sub: argparse._SubParsersAction, name: str, argv: list[str] | None = None) -> None:
    p = sub.add_parser(name, help="describe a dataset", description=__doc__)
    p.add_argument("data", help="dataset spec: a path, FORMAT:PATH, or a name such as fmnist")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    ds = load_dataset(args.data, mmap=True)
    d = ds.describe()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    # names come from files: escaped, so a name cannot send escape sequences to the terminal
    print(f"source:   {printable(d['source'])}\nformat:   {d['format']}")
    print(f"image:    {'x'.join(map(str, d['image_shape_hwc']))} (H x W x C)")
    names = ", ".join(printable(c) for c in ds.classes[:20])
    print(f"classes:  {d['num_classes']}: {names}{' ...' if ds.num_classes > 20 else ''}")
    for split in ("train", "test"):
        if split in d:
            s = d[split]
            print(f"{split + ':':9} n={s['n']} dtype={s['dtype']} range={s['value_range']} "
                  f"mmap={s['memory_mapped']}")
            print(f"{'':9} per class: {s['per_class']}")
    return 0
