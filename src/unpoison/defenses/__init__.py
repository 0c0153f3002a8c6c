"""Defenses: pre-training purifiers (D-VAE and the baselines) and training-time defenses.

Importing this package imports every module in it (:func:`unpoison._registry.discover`), and each registers
its defenses in :data:`DEFENSES` / :data:`TRAIN_DEFENSES`: a new defense is one new module.
"""

from .._registry import discover
from .base import DEFENSES, TRAIN_DEFENSES, Purifier, make_purifier, make_train_defense

discover(__name__)

__all__ = ["DEFENSES", "TRAIN_DEFENSES", "Purifier", "make_purifier", "make_train_defense"]
