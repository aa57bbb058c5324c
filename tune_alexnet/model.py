"""AlexNet adapted to 32x32 CIFAR-10 images, exactly as in the study (docs/STUDY.md).

Layers only: nothing here knows about data, optimizers or Ray.
"""

from __future__ import annotations

import torch
from torch import nn

from .settings import NUM_CLASSES


def _conv_block(c_in: int, c_out: int, kernel: int, batchnorm: bool, pool: bool) -> list[nn.Module]:
    # The study puts BatchNorm *after* the ReLU; keep that order, it changes the numbers.
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, stride=1, padding=kernel // 2), nn.ReLU(inplace=True)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(c_out))
    if pool:
        layers.append(nn.MaxPool2d(2, 2))
    return layers


class AlexNet(nn.Module):
    """36,054,858 parameters without batch norm, 36,057,162 with it (at width 1).

    `width` scales every channel and hidden-unit count; below 1 it gives the same
    network shape cheaply, for smoke runs and tests. The study is width 1.
    """

    def __init__(
        self, dropout: bool = True, batchnorm: bool = False, num_classes: int = NUM_CLASSES, width: float = 1.0
    ):
        super().__init__()
        c1, c2, c3, c4, c5, hidden = (max(1, round(n * width)) for n in (64, 192, 384, 256, 256, 4096))
        self.features = nn.Sequential(
            *_conv_block(3, c1, 5, batchnorm, pool=True),
            *_conv_block(c1, c2, 5, batchnorm, pool=True),
            *_conv_block(c2, c3, 3, batchnorm, pool=False),
            *_conv_block(c3, c4, 3, batchnorm, pool=False),
            *_conv_block(c4, c5, 3, batchnorm, pool=True),
        )
        drop = [nn.Dropout(0.5)] if dropout else []
        self.classifier = nn.Sequential(
            *drop,
            nn.Linear(c5 * 4 * 4, hidden),
            nn.ReLU(inplace=True),
            *drop,
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
