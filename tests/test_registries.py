"""Every family whose members are modules is filled the same way: its package calls
``discover(__name__)`` (every module in it imported; each registers itself), never a hand-written list."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: package -> its registry ("module:attribute")
FAMILIES = {
    "unpoison.attacks": "unpoison.attacks:ATTACKS",
    "unpoison.defenses": "unpoison.defenses:DEFENSES",
    "unpoison.models": "unpoison.models:MODELS",
    "unpoison.data.formats": "unpoison.data._format:FORMATS",
}


@pytest.mark.parametrize("package", sorted(FAMILIES))
def test_family_is_discovered_not_listed(package: str) -> None:
    init = SRC.joinpath(*package.split("."), "__init__.py")
    tree = ast.parse(init.read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "discover"]
    assert len(calls) == 1 and ast.unparse(calls[0]) == "discover(__name__)", f"{init}: no discover(__name__)"
    pkg = importlib.import_module(package)
    members = {m.name for m in pkgutil.iter_modules(pkg.__path__)}
    listed = [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1 and not n.module
              for a in n.names if a.name in members]
    assert not listed, f"{init} lists members by hand: {listed}"


@pytest.mark.parametrize("package", sorted(FAMILIES))
def test_every_registered_member_comes_from_the_package(package: str) -> None:
    """What the registry holds was registered by the package's own modules (a smoke check of discovery)."""
    mod, _, attr = FAMILIES[package].partition(":")
    reg = getattr(importlib.import_module(mod), attr)
    assert reg.names()
    for name in reg.names():
        obj = reg.get(name)
        where = getattr(obj, "__module__", None) or type(obj).__module__
        assert where.startswith(package + "."), (name, where)
