"""Availability poisons behind one registry (``make_attack(name).poison(x, y)``): the paper's eight and three
purification-aware ones.

em, rem, tap, sep, ntga (surrogate-based, l_inf 8/255), lsp, ar (synthetic, l2 1.0 at CIFAR size),
ops (one pixel, l0); em-smooth, colorshift, em-adaptive (l_inf 8/255, made to survive a purifier; em-adaptive
is crafted through a D-VAE). See :mod:`unpoison.attacks.base` for the bounds and how they are verified.
Every module of this package is imported here and registers itself: a new attack is one new module.
"""

from __future__ import annotations

from .._registry import discover
from .base import ATTACKS, Attack, PoisonResult, apply_perturbation, make_attack, register_attack

__all__ = ["ATTACKS", "Attack", "PoisonResult", "make_attack", "register_attack", "apply_perturbation"]

discover(__name__)
