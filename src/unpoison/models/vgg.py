"""VGG-16 with BatchNorm for small images: ceil-mode pooling so 28 px inputs survive five pools."""

from __future__ import annotations

from torch import nn
from torchvision.models import vgg16_bn as tv_vgg16_bn

from ._registry import register_model


@register_model("vgg16", "VGG-16 with BatchNorm, 512-d linear head")
def vgg16(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    m = tv_vgg16_bn()
    m.features[0] = nn.Conv2d(in_channels, 64, 3, padding=1)
    for layer in m.features:
        if isinstance(layer, nn.MaxPool2d):
            layer.ceil_mode = True
    m.avgpool = nn.AdaptiveAvgPool2d(1)
    m.classifier = nn.Linear(512, num_classes)
    return m
