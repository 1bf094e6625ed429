"""UperNet decode head and FCN auxiliary head for semantic segmentation (PAPER.md §1.7, §3.4).

Both follow mmsegmentation's `UPerHead` / `FCNHead` layer for layer, so the paper's ADE20K recipe (channels
1536, pool scales 1/2/3/6, dropout 0.1, aux weight 0.4) means the same thing here. Inputs are the backbone's
4-level pyramid (strides 4/8/16/32); outputs are class logits at stride 4 (UperNet) or stride 16 (FCN).
Plain `BatchNorm2d`: Lightning's `sync_batchnorm` converts it to SyncBN for multi-GPU runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize with `align_corners=False`, the convention of every resize in these heads."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvBNReLU(nn.Sequential):
    """Conv (no bias: BN follows) → BatchNorm → ReLU, "same" padding; mmcv's `ConvModule` with BN."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        nn.init.kaiming_normal_(self[0].weight, mode="fan_out", nonlinearity="relu")


class Classifier(nn.Sequential):
    """Dropout2d → 1×1 conv to class logits, initialised N(0, 0.01) as mmseg's `conv_seg`."""

    def __init__(self, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__(
            nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(), nn.Conv2d(channels, num_classes, 1)
        )
        nn.init.normal_(self[1].weight, std=0.01)
        nn.init.zeros_(self[1].bias)


class PyramidPooling(nn.Module):
    """PSPNet's pooling module: context pooled at several grid sizes, brought back and fused by a 3×3 conv."""

    def __init__(self, in_channels: int, channels: int, pool_scales: Sequence[int]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvBNReLU(in_channels, channels, 1))
            for scale in pool_scales
        )
        self.bottleneck = ConvBNReLU(in_channels + len(pool_scales) * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [resize(stage(x), x.shape[-2:]) for stage in self.stages]
        return self.bottleneck(torch.cat([x, *pooled], dim=1))


class UperNetHead(nn.Module):
    """UperNet: PPM on the coarsest level, top-down FPN, all levels fused → logits at stride 4."""

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if len(in_channels) < 2:
            raise ValueError(
                f"UperNetHead needs at least 2 pyramid levels, got in_channels={list(in_channels)}"
            )
        *fine, coarsest = in_channels
        self.ppm = PyramidPooling(coarsest, channels, pool_scales)
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in fine)
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in fine)
        self.fpn_bottleneck = ConvBNReLU(len(in_channels) * channels, channels, 3)
        self.classifier = Classifier(channels, num_classes, dropout)

    def forward(self, pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        *fine, coarsest = pyramid
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, fine, strict=True)] + [self.ppm(coarsest)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down: each level receives the coarser one
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1], strict=True)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([resize(x, size) for x in outs], dim=1))
        return self.classifier(fused)


class FCNHead(nn.Module):
    """Auxiliary head: one 3×3 conv-BN-ReLU on pyramid level `in_index` (stride 16) → logits."""

    def __init__(
        self, in_channels: int, channels: int, num_classes: int, in_index: int = 2, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.in_index = in_index
        self.conv = ConvBNReLU(in_channels, channels, 3)
        self.classifier = Classifier(channels, num_classes, dropout)

    def forward(self, pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.conv(pyramid[self.in_index]))
