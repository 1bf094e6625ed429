"""Convolutions with their own backward, written as forward convolutions and matmuls.

PyTorch's CPU backward of these convolutions (oneDNN) ran 2-3x slower per multiply-add than their forward
on the machines we measured, where a forward convolution and a GEMM run at full speed: the 3x3 convs of
the branch merge (768 channels at 98^2: 7.5 s backward against 1.4 s forward on a 2-core AVX2 EPYC) and
the transposed convs of the pyramid taps (5.1 s against 1.9 s on an AVX-512 machine). Both modules keep
their `nn` parents' parameters and state-dict keys. On GPU the same formulas run as cuDNN convolutions and
GEMMs.

Under autocast the forward's convolution casts as usual; the backward computes in the gradient's dtype and
returns each gradient in its input's dtype, as autocast's own casts would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def _save_inputs(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Both Functions keep the input and the weight for backward, and only the bias's dtype."""
    ctx.save_for_backward(x, weight)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _bias_grad(ctx, grad: torch.Tensor) -> torch.Tensor | None:
    if ctx.bias_dtype is None or not ctx.needs_input_grad[2]:
        return None
    return grad.sum((0, 2, 3)).to(ctx.bias_dtype)


class _SameConvFunction(torch.autograd.Function):
    """`conv2d` with an odd square kernel, stride 1 and zero padding k // 2 (the output keeps the input's
    size). Backward: the input gradient is the forward conv of the gradient with the kernel flipped and its
    channels swapped; the weight gradient is one matmul per kernel tap, over views of a zero-padded
    channels-last copy of the input (no copy per tap)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        _save_inputs(ctx, x, weight, bias)
        return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        pad = weight.shape[-1] // 2
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            flipped = weight.to(grad.dtype).transpose(0, 1).flip(2, 3)
            grad_x = F.conv2d(grad, flipped, padding=pad).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = _same_conv_weight_grad(x.to(grad.dtype), grad, weight.shape[-1]).to(weight.dtype)
        return grad_x, grad_weight, _bias_grad(ctx, grad)


def _same_conv_weight_grad(x: torch.Tensor, grad: torch.Tensor, k: int) -> torch.Tensor:
    """sum over pixels of grad[o, y, x] * input[i, y + dy - k//2, x + dx - k//2] for every tap (dy, dx).

    Input and gradient are laid out on the same zero-padded grid, flattened to rows of channels; the
    gradient's rows outside the image are zero. Row r of the gradient then meets row r + dy * W_pad + dx of
    the input for tap (dy, dx): each tap is one matmul of the gradient with a contiguous slice of the input.
    """
    B, C, H, W = x.shape
    out_channels, pad = grad.shape[1], k // 2
    Hp, Wp = H + 2 * pad, W + 2 * pad
    rows = B * Hp * Wp
    padded = x.new_zeros(rows + (k - 1) * (Wp + 1), C)  # the slice of the last tap runs past the grid
    padded[:rows].view(B, Hp, Wp, C)[:, pad : pad + H, pad : pad + W] = x.permute(0, 2, 3, 1)
    grad_rows = grad.new_zeros(B, Hp, Wp, out_channels)
    grad_rows[:, :H, :W] = grad.permute(0, 2, 3, 1)
    grad_rows_t = grad_rows.view(rows, out_channels).t()
    taps = grad.new_empty(k, k, out_channels, C)
    for dy in range(k):
        for dx in range(k):
            start = dy * Wp + dx
            torch.mm(grad_rows_t, padded[start : start + rows], out=taps[dy, dx])
    return taps.permute(2, 3, 0, 1).contiguous()


def same_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, padding=k // 2)` for an odd k x k kernel, with `_SameConvFunction`'s
    backward."""
    return _SameConvFunction.apply(x, weight, bias)


class SameConv2d(nn.Conv2d):
    """A k x k conv (odd k) with stride 1 and zero padding k // 2, whose backward is `_SameConvFunction`'s."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True) -> None:
        if kernel_size % 2 == 0:
            raise ValueError(f"SameConv2d: the kernel size must be odd, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return same_conv2d(x, self.weight, self.bias)


class _PatchUpsampleFunction(torch.autograd.Function):
    """`conv_transpose2d` with kernel = stride. Each output pixel comes from exactly one input pixel, so
    the input gradient is a strided conv of the gradient, and the weight gradient one matmul of the input
    pixels with the gradient's k x k patches."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        _save_inputs(ctx, x, weight, bias)
        return F.conv_transpose2d(x, weight, bias, stride=weight.shape[-2:])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        B, C, H, W = x.shape
        out_channels, kh, kw = weight.shape[1:]
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = F.conv2d(grad, weight.to(grad.dtype), stride=(kh, kw)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            # (pixel, (p, q, o)): channels innermost, so a channels-last gradient copies in whole rows
            patches = grad.permute(0, 2, 3, 1).reshape(B, H, kh, W, kw, out_channels).transpose(2, 3)
            patches = patches.reshape(B * H * W, kh * kw * out_channels)
            pixels = x.to(grad.dtype).permute(1, 0, 2, 3).reshape(C, B * H * W)
            grad_weight = (pixels @ patches).view(C, kh, kw, out_channels).permute(0, 3, 1, 2)
            grad_weight = grad_weight.to(weight.dtype).contiguous()
        return grad_x, grad_weight, _bias_grad(ctx, grad)


def patch_upsample(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.conv_transpose2d(x, weight, bias, stride=kernel size)` with `_PatchUpsampleFunction`'s backward."""
    return _PatchUpsampleFunction.apply(x, weight, bias)


class PatchUpsample(nn.ConvTranspose2d):
    """A k x k, stride-k transposed conv (each input pixel becomes a k x k patch): upstream's `fpn` taps,
    same parameters and state-dict keys, with `_PatchUpsampleFunction`'s backward."""

    def __init__(self, channels: int, factor: int = 2) -> None:
        super().__init__(channels, channels, factor, factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """No `output_size`: with kernel = stride and no padding the output size is always k x the input's."""
        return patch_upsample(x, self.weight, self.bias)


# Autocast casts their weights inside an autograd.Function's forward, where grad mode is off: the bf16 copies
# are neither cached nor saved for backward (the Function saves the fp32 weight), unlike nn.Conv2d's.
CASTS_WEIGHTS_PER_CALL = (SameConv2d, PatchUpsample)
