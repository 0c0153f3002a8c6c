"""A tiny name -> factory registry, one instance per family (datasets, models, attacks, defenses).

The CLI, the benchmark and the Python API all read the same registry, so a new entry shows up
everywhere at once. A family's package finds its members with :func:`discover` (every module in it is
imported, and each registers itself), so adding a module is the whole of adding a member: there is no
list of names to keep.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable, Iterator
from importlib import import_module
from typing import Generic, TypeVar

from .params import unknown

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps a lower-case name to an object (usually a class or factory) plus a one-line help.

    :meth:`register` sets a registered class's ``name`` attribute, so the name is written once."""

    def __init__(self, family: str) -> None:
        self.family = family
        self._items: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, help: str = "") -> Callable[[T], T]:  # noqa: A002
        def deco(obj: T) -> T:
            key = name.lower()
            if key in self._items:
                raise RuntimeError(f"{self.family} {name!r} registered twice")
            if isinstance(obj, type):
                obj.name = key  # type: ignore[attr-defined]
            self._items[key] = obj
            doc = help or (getattr(obj, "__doc__", None) or "").strip().splitlines()[:1]
            self._help[key] = doc if isinstance(doc, str) else (doc[0] if doc else "")
            return obj

        return deco

    def get(self, name: str) -> T:
        key = name.lower()
        if key not in self._items:
            raise unknown(self.family, name, sorted(self._items))
        return self._items[key]

    def names(self) -> list[str]:
        return sorted(self._items)

    def in_order(self) -> list[str]:
        """The names in registration order (a report lays its sections out in the order kinds are defined)."""
        return list(self._items)

    def help(self, name: str) -> str:
        return self._help[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def discover(package: str) -> list[str]:
    """Import every module of ``package`` (recursively), so each registers what it defines; returns their
    names. A module that fails to import fails loudly: a member never goes missing in silence."""
    pkg = import_module(package)
    found = []
    for info in pkgutil.walk_packages(pkg.__path__, prefix=package + "."):
        import_module(info.name)
        found.append(info.name)
    return found
