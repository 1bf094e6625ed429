"""Taps that bring backbone maps to the strides 4/8/16/32 a detector or segmenter expects (PAPER.md §1.7).

The simple feature pyramid (ViTDet) feeds one stride-16 map to all four taps; the regular-FPN variant feeds
four maps (three intermediate merges and the final one) whose strides follow branch 0's blocks.
"""

from __future__ import annotations

from typing import Literal

import torch
from timm.layers import LayerNorm2d
from torch import nn

from piip.models.backbone.convs import PatchUpsample

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
        return PatchUpsample(channels)
    if in_stride == 4 * out_stride:
        return nn.Sequential(
            PatchUpsample(channels), tap_norm(norm, channels), nn.GELU(), PatchUpsample(channels)
        )
    if out_stride % in_stride == 0:
        return nn.MaxPool2d(out_stride // in_stride)
    raise ValueError(f"no pyramid tap from stride {in_stride} to stride {out_stride}")


class PyramidTaps(nn.Module):
    """One tap per pyramid level; `strides` picks the levels a head reads (DINO: 8/16/32). A level left out
    keeps its place as an empty slot, so `taps.{i}` is upstream's `fpn{i+1}` whatever the head (upstream's
    2- and 4-branch DINO models have no `fpn1`)."""

    def __init__(
        self,
        in_strides: list[int],
        channels: list[int],
        norm: TapNorm = "groupnorm",
        strides: list[int] | tuple[int, ...] = PYRAMID_STRIDES,
    ) -> None:
        super().__init__()
        unknown = sorted(set(strides) - set(PYRAMID_STRIDES))
        if unknown or not strides or list(strides) != sorted(set(strides)):
            raise ValueError(
                f"pyramid strides {list(strides)}: expected increasing strides out of {list(PYRAMID_STRIDES)}"
            )
        self.keep = [PYRAMID_STRIDES.index(s) for s in strides]
        self.taps = nn.ModuleList(
            pyramid_tap(s, t, c, norm) if i in self.keep else nn.Identity()
            for i, (s, t, c) in enumerate(zip(in_strides, PYRAMID_STRIDES, channels, strict=True))
        )
        self.out_channels = [channels[i] for i in self.keep]
        self.strides = list(strides)

    def forward(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """The 4 maps the backbone taps -> the kept levels only."""
        return [self.taps[i](maps[i]) for i in self.keep]
