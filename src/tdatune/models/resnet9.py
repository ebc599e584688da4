"""ResNet-9 (the fast CIFAR-10 network of Page's DAWNBench entry, as used by TRAK for CIFAR-2).

Layout for base width w (w = 64 is the canonical network, about 6.6 M parameters):
prep conv(w) -> conv(2w) + pool -> residual(2w) -> conv(4w) + pool -> conv(8w) + pool
-> residual(8w) -> global max pool -> linear -> scale. Every conv is 3x3 + BatchNorm + ReLU.
A smaller ``width`` keeps CPU runs cheap; the architecture is otherwise unchanged.

:class:`GroupNormResNet9` is the same network with GroupNorm in place of every BatchNorm
(``resnet9(..., norm="group")``): no running statistics, so training and evaluation compute the
same function of each example, and no buffers, so batched retraining can train it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tdatune.utils.checks import check_choice

NORMS = ("batch", "group")
GROUPS = 8  # GroupNorm groups per layer (fewer where a layer's channels are not a multiple)


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    """3x3 convolution, BatchNorm, ReLU, optionally followed by 2x2 max pooling."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    """x + f(x) with f two conv-BN-ReLU blocks of the same width."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x plus the residual branch."""
        return x + self.body(x)


class ResNet9(nn.Module):
    """ResNet-9 for [B, C, H, W] images (H, W >= 8); ``width`` is the first layer's channels."""

    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3,
                 output_scale: float = 0.125) -> None:
        super().__init__()
        if width < 1 or num_classes < 2:
            raise ValueError(f"need width >= 1 and num_classes >= 2, got {width}, {num_classes}")
        w = width
        self.features = nn.Sequential(
            conv_bn(in_channels, w),
            conv_bn(w, 2 * w, pool=True),
            Residual(2 * w),
            conv_bn(2 * w, 4 * w, pool=True),
            conv_bn(4 * w, 8 * w, pool=True),
            Residual(8 * w),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(8 * w, num_classes, bias=False)
        self.output_scale = float(output_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, num_classes] for images [B, C, H, W]."""
        if x.dim() != 4:
            raise ValueError(f"ResNet9 expects images [B, C, H, W], got shape {tuple(x.shape)}")
        return self.classifier(self.features(x)) * self.output_scale


def group_norm(channels: int, groups: int = GROUPS) -> nn.GroupNorm:
    """GroupNorm over ``channels`` in ``gcd(channels, groups)`` groups (``groups`` when the
    channels are a multiple of it, as at every width that is a multiple of ``groups``)."""
    return nn.GroupNorm(math.gcd(int(channels), int(groups)), int(channels))


class GroupNormResNet9(ResNet9):
    """ResNet-9 with GroupNorm (``groups`` groups, affine) in place of every BatchNorm.

    Built as :class:`ResNet9` and then each ``BatchNorm2d`` swapped for :func:`group_norm` of
    its channels, so the convolutions, their initialisation from a seed and the module paths
    are those of ResNet-9 (``features.0.1`` is the first block's norm in both).
    """

    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3,
                 output_scale: float = 0.125, groups: int = GROUPS) -> None:
        if groups < 1:
            raise ValueError(f"need groups >= 1, got {groups}")
        super().__init__(num_classes, width, in_channels, output_scale)
        self.groups = int(groups)
        swaps = [(block, i, layer.num_features) for block in self.modules()
                 if isinstance(block, nn.Sequential)
                 for i, layer in enumerate(block) if isinstance(layer, nn.BatchNorm2d)]
        for block, i, channels in swaps:
            block[i] = group_norm(channels, self.groups)


def resnet9(num_classes: int = 10, width: int = 64, in_channels: int = 3, *,
            norm: str = "batch", groups: int = GROUPS) -> ResNet9:
    """ResNet-9 with BatchNorm (``norm="batch"``, the canonical network) or GroupNorm
    (``norm="group"``, ``groups`` groups per layer)."""
    check_choice("norm", norm, NORMS)
    if norm == "group":
        return GroupNormResNet9(num_classes, width, in_channels, groups=groups)
    return ResNet9(num_classes, width, in_channels)
