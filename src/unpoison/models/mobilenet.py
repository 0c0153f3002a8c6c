"""MobileNet-V2 for small images: first conv at stride 1 (the usual CIFAR adaptation), from torchvision."""

from __future__ import annotations

from torch import nn
from torchvision.models import mobilenet_v2 as tv_mobilenet_v2

from ._registry import register_model


@register_model("mobilenetv2", "MobileNet-V2, stride-1 stem")
def mobilenetv2(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    m = tv_mobilenet_v2(num_classes=num_classes)
    first = m.features[0][0]
    m.features[0][0] = nn.Conv2d(in_channels, first.out_channels, 3, 1 if image_size <= 64 else 2, 1, bias=False)
    return m
