"""The classifier registry: one entry per architecture, each ``fn(num_classes, in_channels, image_size)``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .._registry import Registry

ModelFn = Callable[[int, int, int], nn.Module]
MODELS: Registry[ModelFn] = Registry("model")
register_model = MODELS.register
