"""Small fast CNNs: the CPU presets of the scoring protocol.

Three conv stages (conv-BN-ReLU x n, max-pool), global max-pool and a linear head. ``smallcnn``
(16-32-64, two convs a stage) is the CPU scoring preset: measured on Fashion-MNIST, the one-conv
variant underfits (train accuracy 91% on the full split, 86.7% on a 10k subset) and then learns
poison shortcuts only partly, which would understate attacks (docs/results/evaluate.md).
``tinycnn`` is for tests.
"""

from __future__ import annotations

import torch
from torch import nn

from ._registry import register_model


def _block(cin: int, cout: int, n: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Conv2d(cin if i == 0 else cout, cout, 3, padding=1, bias=False),
                   nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return layers


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, widths: tuple[int, ...] = (16, 32, 64),
                 convs_per_stage: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for w in widths:
            layers += _block(cin, w, convs_per_stage) + [nn.MaxPool2d(2, ceil_mode=True)]
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.head(torch.flatten(nn.functional.adaptive_max_pool2d(x, 1), 1))


@register_model("smallcnn", "3-stage CNN (16-32-64, 2 convs a stage), the CPU preset of the scoring protocol")
def smallcnn(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return SmallCNN(num_classes, in_channels, (16, 32, 64), convs_per_stage=2)


@register_model("tinycnn", "3-stage CNN (8-16-32) for tests and smoke runs")
def tinycnn(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return SmallCNN(num_classes, in_channels, (8, 16, 32))
