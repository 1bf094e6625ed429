"""Taps that bring backbone maps to the strides 4/8/16/32 a detector or segmenter expects (PAPER.md §1.7).

The simple feature pyramid (ViTDet) feeds one stride-16 map to all four taps; the regular-FPN variant feeds
four maps (three intermediate merges and the final one) whose strides follow branch 0's blocks.
"""

from __future__ import annotations

from typing import Literal

import torch
from timm.layers import LayerNorm2d
from torch import nn

PYRAMID_STRIDES = (4, 8, 16, 32)
TapNorm = Literal["groupnorm", "layernorm"]


def tap_norm(kind: TapNorm, channels: int) -> nn.Module:
    """PIIP's taps normalise with GroupNorm(32); upstream's single-branch baselines (ViTDet's simple
    pyramid in `vit_models`/`InternViT6B`) with a per-pixel LayerNorm over channels (eps 1e-6)."""
    if kind == "layernorm":
        return LayerNorm2d(channels, eps=1e-6)
    if kind == "groupnorm":
        return nn.GroupNorm(32, channels)
    raise ValueError(f"model.pyramid_norm: expected 'groupnorm' or 'layernorm', got {kind!r}")


def pyramid_tap(in_stride: int, out_stride: int, channels: int, norm: TapNorm = "groupnorm") -> nn.Module:
    """Transposed convs to go up, max-pooling to go down, nothing when the stride already fits."""
    if in_stride == out_stride:
        return nn.Identity()
    if in_stride == 2 * out_stride:
        return nn.ConvTranspose2d(channels, channels, 2, 2)
    if in_stride == 4 * out_stride:
        return nn.Sequential(
            nn.ConvTranspose2d(channels, channels, 2, 2),
            tap_norm(norm, channels),
            nn.GELU(),
            nn.ConvTranspose2d(channels, channels, 2, 2),
        )
    if out_stride % in_stride == 0:
        return nn.MaxPool2d(out_stride // in_stride)
    raise ValueError(f"no pyramid tap from stride {in_stride} to stride {out_stride}")


class PyramidTaps(nn.Module):
    def __init__(self, in_strides: list[int], channels: list[int], norm: TapNorm = "groupnorm") -> None:
        super().__init__()
        self.taps = nn.ModuleList(
            pyramid_tap(s, t, c, norm) for s, t, c in zip(in_strides, PYRAMID_STRIDES, channels, strict=True)
        )
        self.out_channels = list(channels)
        self.strides = list(PYRAMID_STRIDES)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        return [tap(x) for tap, x in zip(self.taps, maps, strict=True)]
