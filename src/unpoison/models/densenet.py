"""DenseNet-121 with a CIFAR stem (3x3 conv, no initial pooling), from torchvision."""

from __future__ import annotations

from torch import nn
from torchvision.models import densenet121 as tv_densenet121

from ._registry import register_model


@register_model("densenet121", "DenseNet-121, CIFAR stem")
def densenet121(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    m = tv_densenet121(num_classes=num_classes)
    m.features.conv0 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    m.features.pool0 = nn.Identity()
    return m
