"""unpoison: make availability-poisoned image datasets learnable again.

Public API (lazy, so ``import unpoison`` stays cheap)::

    from unpoison import load_dataset, save_dataset, ImageDataset
    from unpoison import DVAEPurifier, TrainConfig, create_model, evaluate
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "ImageDataset": "unpoison.data",
    "load_dataset": "unpoison.data",
    "save_dataset": "unpoison.data",
    "create_model": "unpoison.models",
    "list_models": "unpoison.models",
    "evaluate": "unpoison.scoring",
    "TrainConfig": "unpoison.train",
    "DVAEPurifier": "unpoison.defenses.dvae",
    "UserError": "unpoison.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'unpoison' has no attribute {name!r}")
