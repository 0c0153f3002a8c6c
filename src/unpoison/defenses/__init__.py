"""Defenses: pre-training purifiers (D-VAE and the baselines) and training-time defenses.

Importing this package registers every defense in :data:`DEFENSES` / :data:`TRAIN_DEFENSES`.
"""

from importlib import import_module

from .base import DEFENSES, TRAIN_DEFENSES, Purifier, make_purifier, make_train_defense  # noqa: F401

# one module per defense family; each registers itself on import
for _mod in ("dvae", "simple", "avatar", "training"):
    import_module(f"{__name__}.{_mod}")

__all__ = ["DEFENSES", "TRAIN_DEFENSES", "Purifier", "make_purifier", "make_train_defense"]
