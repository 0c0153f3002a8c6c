"""One preset mechanism for every family: scoring, D-VAE, each attack, diffusion, benchmark grids.

Each family keeps its preset *values* in its own module (``train.TRAIN_PRESETS``, ``defenses.dvae.PRESETS``,
an attack's ``PRESETS``, ``defenses.avatar.PRESETS``, a bench config's ``presets:``) and registers them here
as a :class:`PresetTable`, which

* names the settings a preset or an override may touch, so a typo (``train: {epoch: 4}``) is an error,
  never silently ignored;
* resolves ``auto`` (``paper`` on CUDA, ``cpu`` otherwise) and command-level aliases (a family without its
  own ``smoke`` preset sizes a smoke run with its ``cpu`` one);
* gives the CLI its ``--preset`` choices, so the registries are the only list of names.

A command resolves ``auto`` once (:func:`resolve_auto`) and passes the concrete name to every family it
runs, so one ``--preset`` sizes everything the command does.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._registry import Registry
from .errors import UserError
from .params import unknown
from .tensors import pick_device

AUTO = "auto"


@dataclass(frozen=True)
class PresetTable:
    """A family's named presets (its own dict, read live) plus the keys they may set."""

    family: str
    table: Mapping[str, Mapping[str, Any]]
    #: settings a preset or an override may set; ``None``: the family checks them itself
    keys: Collection[str] | None = None
    #: command-level names this family has no preset of, mapped to one it has (``smoke -> cpu``)
    aliases: Mapping[str, str] = field(default_factory=dict)
    help: str = ""
    #: how messages name the family (default: ``family``)
    label: str = ""

    def __post_init__(self) -> None:
        if self.keys is not None:  # a preset with a misspelled key is a bug: fail at import, not at run time
            for name, values in self.table.items():
                bad = sorted(set(values) - set(self.keys))
                if bad:
                    raise RuntimeError(f"{self.family} preset {name!r} sets unknown key(s) {', '.join(bad)}")
        for alias, target in self.aliases.items():
            if target not in self.table:
                raise RuntimeError(f"{self.family} alias {alias!r} -> unknown preset {target!r}")

    def names(self) -> list[str]:
        """The family's own presets."""
        return list(self.table)

    def choices(self) -> list[str]:
        """Every name :meth:`resolve` accepts: ``auto``, the family's presets, the aliases."""
        return [AUTO, *self.table, *(a for a in self.aliases if a not in self.table)]

    def resolve(self, name: str | None, device: Any = "auto") -> str:
        """The concrete preset ``name`` means here (``auto`` by device, aliases followed)."""
        name = AUTO if name is None else str(name)
        if name == AUTO:
            name = resolve_auto(device)
        if name not in self.table and name in self.aliases:
            name = self.aliases[name]
        if name not in self.table:
            raise unknown(f"{self.label or self.family} preset", name, self.choices())
        return name

    def values(self, name: str | None, overrides: Mapping[str, Any] | None = None, device: Any = "auto",
               skip_none: bool = True) -> dict[str, Any]:
        """The preset's settings with ``overrides`` on top; an unknown override key is a :class:`UserError`."""
        out = dict(self.table[self.resolve(name, device)])
        over = dict(overrides or {})
        self.check_keys(over)
        out.update({k: v for k, v in over.items() if v is not None or not skip_none})
        return out

    def check_keys(self, keys: Collection[str]) -> None:
        if self.keys is None:
            return
        bad = sorted(set(keys) - set(self.keys))
        if bad:
            raise UserError(f"unknown {self.label or self.family} setting(s) {', '.join(bad)}; "
                            f"known: {', '.join(sorted(self.keys))}")


#: every family's table, by family name (``scoring``, ``dvae``, ``diffusion``, ``attack em``, ``bench``, ...)
PRESET_TABLES: Registry[PresetTable] = Registry("preset family")


def register_presets(table: PresetTable) -> PresetTable:
    """Register a family's table (once, at import of the module that owns its values)."""
    PRESET_TABLES.register(table.family, table.help)(table)
    return table


def show_value(v: Any) -> str:
    """A default or preset value as ``--help`` shows it (floats to 4 significant digits)."""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def resolve_auto(device: Any = "auto") -> str:
    """``auto`` -> ``paper`` when ``device`` is (or ``auto`` finds) a CUDA device, else ``cpu``."""
    return "paper" if pick_device(device).type == "cuda" else "cpu"


def choose(name: str | None, device: Any = "auto") -> tuple[str, str | None]:
    """A command's preset, chosen once: ``(concrete name, the line to print or None)``."""
    if name not in (None, AUTO):
        return str(name), None
    chosen = resolve_auto(device)
    why = "a CUDA device is present" if chosen == "paper" else "no CUDA device"
    return chosen, f"preset {chosen} (auto: {why}; choose with --preset)"


def common_choices(tables: list[PresetTable]) -> list[str]:
    """Names every table in ``tables`` accepts (``auto`` first): the ``--preset`` choices of a command."""
    if not tables:
        return [AUTO]
    sets = [set(t.choices()) for t in tables]
    common = set.intersection(*sets)
    ordered = [n for t in tables for n in t.choices()]
    return list(dict.fromkeys(n for n in ordered if n in common))
