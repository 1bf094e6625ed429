"""Taps that bring backbone maps to the strides 4/8/16/32 a detector or segmenter expects (PAPER.md §1.7).

The simple feature pyramid (ViTDet) feeds one stride-16 map to all four taps; the regular-FPN variant feeds
four maps (three intermediate merges and the final one) whose strides follow branch 0's blocks.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
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


class _PatchUpsampleFunction(torch.autograd.Function):
    """`conv_transpose2d` with kernel = stride, whose backward is a strided conv for the input gradient and
    one matmul for the weight gradient (each output pixel comes from exactly one input pixel, so that is
    the whole gradient). PyTorch's own backward of this op on CPU ran 2.7x slower on channels-last maps
    (768 channels, 196^2 -> 392^2: 5.1 s against 1.9 s); on GPU both are cuDNN convolutions and a GEMM.

    Autocast casts inside `forward`; the backward computes in the gradient's dtype and returns each
    gradient in its input's dtype, as autocast's own casts would.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return F.conv_transpose2d(x, weight, bias, stride=weight.shape[-2:])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        B, C, H, W = x.shape
        out_channels, kh, kw = weight.shape[1:]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad, weight.to(grad.dtype), stride=(kh, kw)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            patches = grad.reshape(B, out_channels, H, kh, W, kw).permute(0, 2, 4, 1, 3, 5)
            patches = patches.reshape(B * H * W, -1)  # (pixel, (o, p, q)): the weight's own order
            pixels = x.to(grad.dtype).permute(1, 0, 2, 3).reshape(C, B * H * W)
            grad_weight = (pixels @ patches).view(weight.shape).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3)).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias


def patch_upsample(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.conv_transpose2d(x, weight, bias, stride=kernel size)` with `_PatchUpsampleFunction`'s backward."""
    return _PatchUpsampleFunction.apply(x, weight, bias)


class PatchUpsample(nn.ConvTranspose2d):
    """A k x k, stride-k transposed conv (each input pixel becomes a k x k patch): upstream's `fpn` taps,
    same parameters and state-dict keys, with a faster backward (`_PatchUpsampleFunction`)."""

    def __init__(self, channels: int, factor: int = 2) -> None:
        super().__init__(channels, channels, factor, factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """No `output_size`: with kernel = stride and no padding the output size is always k x the input's."""
        return patch_upsample(x, self.weight, self.bias)


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
