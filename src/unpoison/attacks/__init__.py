"""The paper's eight availability poisons behind one registry (``make_attack(name).poison(x, y)``).

em, rem, tap, sep, ntga (surrogate-based, l_inf 8/255), lsp, ar (synthetic, l2 1.0 at CIFAR size),
ops (one pixel, l0). See :mod:`unpoison.attacks.base` for the bounds and how they are verified.
"""

from __future__ import annotations

from importlib import import_module

from .base import ATTACKS, Attack, PoisonResult, apply_perturbation, make_attack, register_attack

__all__ = ["ATTACKS", "Attack", "PoisonResult", "make_attack", "register_attack", "apply_perturbation"]

for _mod in ("lsp", "ar", "ops", "em", "rem", "tap", "sep", "ntga"):
    try:
        import_module(f"{__name__}.{_mod}")
    except ModuleNotFoundError as e:  # TODO(attacks): drop once every module exists
        if e.name != f"{__name__}.{_mod}":
            raise
