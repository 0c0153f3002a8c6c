"""Every family whose members are modules is filled the same way: its package calls
``discover(__name__)`` (every module in it imported; each registers itself), never a hand-written list."""

from __future__ import annotations

import ast
import importlib
import json
import os
import pkgutil
import subprocess
import sys
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


def test_every_registered_member_comes_from_the_package() -> None:
    """In a fresh interpreter (tests and plugins register members of their own in this one), everything each
    registry holds was registered by a module of the family's package: discovery found them all."""
    code = (
        "import importlib, json, sys\n"
        "out = {}\n"
        "for pkg, spec in json.loads(sys.argv[1]).items():\n"
        "    mod, _, attr = spec.partition(':')\n"
        "    importlib.import_module(pkg)\n"
        "    reg = getattr(importlib.import_module(mod), attr)\n"
        "    out[pkg] = {n: getattr(reg.get(n), '__module__', None) or type(reg.get(n)).__module__\n"
        "                for n in reg.names()}\n"
        "print(json.dumps(out))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code, json.dumps(FAMILIES)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    found = json.loads(r.stdout)
    for package, members in found.items():
        assert members, package
        wrong = {n: m for n, m in members.items() if not m.startswith(package + ".")}
        assert not wrong, f"{package}: registered from elsewhere: {wrong}"
