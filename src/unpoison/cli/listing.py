"""``unpoison list``: the registries (datasets, formats, models, attacks, defenses, presets) in one place."""

from __future__ import annotations

import argparse
from importlib import import_module

from ..data import DATASETS, FORMATS
from ..models import MODELS
from ..presets import PRESET_TABLES


def add_parser(sub: argparse._SubParsersAction, name: str, argv: list[str] | None = None) -> None:
    p = sub.add_parser(name, help="list datasets, formats, models, attacks and defenses", description=__doc__)
    p.set_defaults(func=run)


def registries() -> dict[str, object]:
    regs: dict[str, object] = {"datasets": DATASETS, "formats": FORMATS, "models": MODELS}
    for fam, mod, attr in (("attacks", "unpoison.attacks", "ATTACKS"), ("defenses", "unpoison.defenses", "DEFENSES"),
                           ("train-time defenses", "unpoison.defenses", "TRAIN_DEFENSES")):
        try:
            regs[fam] = getattr(import_module(mod), attr)
        except (ImportError, AttributeError):
            continue
    return regs


def run(args: argparse.Namespace) -> int:
    for fam, reg in registries().items():
        print(f"{fam}:")
        for n in reg.names():  # type: ignore[attr-defined]
            print(f"  {n:16} {reg.help(n)}")  # type: ignore[attr-defined]
    for mod in ("unpoison.train", "unpoison.bench.grid", "unpoison.defenses.avatar"):  # register their presets
        import_module(mod)

    print("presets (auto: paper on CUDA, cpu on CPU):")
    for fam in PRESET_TABLES.names():
        t = PRESET_TABLES.get(fam)
        alias = "".join(f", {a}->{b}" for a, b in t.aliases.items())
        print(f"  {fam:16} {', '.join(t.names())}{alias}")
    return 0
