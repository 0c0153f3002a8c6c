"""ResNet-18/50 with the CIFAR stem (3x3 conv, stride 1, no max-pool), from torchvision's blocks."""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet18 as tv_resnet18
from torchvision.models import resnet50 as tv_resnet50

from ._registry import register_model


def cifar_stem(model: nn.Module, in_channels: int) -> nn.Module:
    model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


@register_model("resnet18", "ResNet-18, CIFAR stem (the paper's main model)")
def resnet18(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return cifar_stem(tv_resnet18(num_classes=num_classes), in_channels)


@register_model("resnet50", "ResNet-50, CIFAR stem")
def resnet50(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return cifar_stem(tv_resnet50(num_classes=num_classes), in_channels)
