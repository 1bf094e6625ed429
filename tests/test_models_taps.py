"""`PatchUpsample`, the pyramid taps' transposed conv with its own backward, against `nn.ConvTranspose2d`:
outputs and the gradients of input, weight and bias, in float64 (gradcheck), float32 on both memory
layouts, and bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from piip.models.backbone.taps import PatchUpsample, patch_upsample, pyramid_tap


def reference_of(up: PatchUpsample) -> nn.ConvTranspose2d:
    factor = up.kernel_size[0]
    ref = nn.ConvTranspose2d(up.in_channels, up.out_channels, factor, factor).to(up.weight.dtype)
    ref.load_state_dict(up.state_dict())
    return ref


def grads(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    out = module(x)
    out.backward(grad_out)
    result = [out.detach(), x.grad, module.weight.grad, module.bias.grad]
    module.zero_grad(set_to_none=True)
    return result


@pytest.mark.parametrize("factor", [2, 3])
def test_gradcheck_in_float64(factor):
    up = PatchUpsample(3, factor).double()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(patch_upsample, (x, up.weight, up.bias))
    assert torch.autograd.gradcheck(up, (x,))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_matches_conv_transpose_in_float32(memory_format):
    up = PatchUpsample(16)
    x = torch.randn(2, 16, 7, 9).contiguous(memory_format=memory_format)
    grad_out = torch.randn(2, 16, 14, 18).contiguous(memory_format=memory_format)
    for ours, theirs in zip(grads(up, x, grad_out), grads(reference_of(up), x, grad_out), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_returns_gradients_in_the_parameters_dtype():
    up = PatchUpsample(16)
    x = torch.randn(2, 16, 6, 6)
    grad_out = torch.randn(2, 16, 12, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = up(x.requires_grad_())
    assert out.dtype == torch.bfloat16
    out.backward(grad_out.bfloat16())
    assert x.grad.dtype == up.weight.grad.dtype == up.bias.grad.dtype == torch.float32
    reference = grads(reference_of(up), x, grad_out)
    for ours, theirs in zip([x.grad, up.weight.grad, up.bias.grad], reference[1:], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0.05, atol=0.05 * theirs.abs().max().item())


def test_frozen_input_gets_no_gradient_and_the_taps_use_it():
    up = PatchUpsample(4)
    up(torch.randn(1, 4, 3, 3)).sum().backward()  # input without grad: only the parameters get one
    assert up.weight.grad is not None and up.bias.grad is not None
    four_times = pyramid_tap(16, 4, 32)
    assert [type(m) for m in four_times if isinstance(m, nn.ConvTranspose2d)] == [PatchUpsample] * 2
    assert isinstance(pyramid_tap(16, 8, 32), PatchUpsample)
