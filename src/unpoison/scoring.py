"""The scoring protocol's entry point, :func:`evaluate`: score a (possibly purified) training set by clean test
accuracy at the last epoch (what `unpoison evaluate` and the demo report)."""

from __future__ import annotations

from typing import Any

import torch

from .data import ImageDataset
from .train import TrainConfig, TrainDefense, TrainResult, train_classifier


def evaluate(train: ImageDataset, test: ImageDataset | None = None, config: TrainConfig | None = None,
             seed: int = 0, device: str | torch.device = "auto", train_defense: TrainDefense | None = None,
             progress: bool = True, desc: str = "evaluate", memory_budget: str | int | None = None) -> dict[str, Any]:
    """Train on ``train`` and return the protocol's record (final/best accuracy, per class, timings)."""
    res: TrainResult = train_classifier(train, test, config, seed, device, train_defense, progress, desc,
                                        memory_budget=memory_budget)
    test = test or train
    out = res.summary()
    out["per_class_acc"] = dict(zip(test.classes, res.per_class_acc))
    out["train_source"] = train.source
    out["test_source"] = test.source
    out["n_train"] = int(len(train.x_train))
    out["n_test"] = int(len(test.x_test))  # type: ignore[arg-type]
    out["seed"] = seed
    return out
