"""``create_model(name, ...)``: the one way everything builds a classifier."""

from __future__ import annotations

from torch import nn

from ..errors import UserError
from ._registry import MODELS


def create_model(name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """Build a registered classifier for ``in_channels`` x ``image_size``^2 inputs in [0, 1]."""
    if num_classes < 2:
        raise UserError(f"a classifier needs at least 2 classes, got {num_classes}")
    return MODELS.get(name)(num_classes, in_channels, image_size)


def list_models() -> list[str]:
    return MODELS.names()
