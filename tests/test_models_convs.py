"""The convolutions with their own backward (`piip.models.backbone.convs`) against PyTorch's: `PatchUpsample`
(the taps' transposed conv) against `nn.ConvTranspose2d` and `SameConv2d` (the merge's 3x3 conv) against
`nn.Conv2d` — outputs and the gradients of input, weight and bias, in float64 (gradcheck), float32 on both
memory layouts, and bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from piip.models.backbone.convs import PatchUpsample, SameConv2d, patch_upsample, same_conv2d
from piip.models.backbone.merge import merge_projection
from piip.models.backbone.taps import pyramid_tap


def reference_of(module: nn.Module) -> nn.Module:
    """The plain PyTorch module with the same weights."""
    k = module.kernel_size[0]
    bias = module.bias is not None
    if isinstance(module, PatchUpsample):
        ref = nn.ConvTranspose2d(module.in_channels, module.out_channels, k, k, bias=bias)
    else:
        ref = nn.Conv2d(module.in_channels, module.out_channels, k, padding=k // 2, bias=bias)
    ref = ref.to(module.weight.dtype)
    ref.load_state_dict(module.state_dict())
    return ref


def grads(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> list[torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    out = module(x)
    out.backward(grad_out)
    result = [out.detach(), x.grad, module.weight.grad]
    result += [module.bias.grad] if module.bias is not None else []
    module.zero_grad(set_to_none=True)
    return result


def output_size(module: nn.Module, height: int, width: int) -> tuple[int, int]:
    factor = module.kernel_size[0] if isinstance(module, PatchUpsample) else 1
    return height * factor, width * factor


MODULES = {
    "upsample x2": lambda c: PatchUpsample(c, 2),
    "upsample x3": lambda c: PatchUpsample(c, 3),
    "conv 3x3": lambda c: SameConv2d(c, c + 2, 3),
    "conv 3x3 no bias": lambda c: SameConv2d(c, c - 1, 3, bias=False),
    "conv 5x5": lambda c: SameConv2d(c, c, 5),
    "conv 1x1": lambda c: SameConv2d(c, c, 1),
}


@pytest.mark.parametrize("kind", MODULES)
def test_gradcheck_in_float64(kind):
    module = MODULES[kind](3).double()
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    function = patch_upsample if isinstance(module, PatchUpsample) else same_conv2d
    assert torch.autograd.gradcheck(function, (x, module.weight, module.bias))
    assert torch.autograd.gradcheck(module, (x,))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("kind", MODULES)
def test_matches_pytorch_in_float32(kind, memory_format):
    module = MODULES[kind](16)
    x = torch.randn(2, 16, 7, 9).contiguous(memory_format=memory_format)
    grad_out = torch.randn(2, module.out_channels, *output_size(module, 7, 9))
    grad_out = grad_out.contiguous(memory_format=memory_format)
    reference = grads(reference_of(module), x, grad_out)
    for ours, theirs in zip(grads(module, x, grad_out), reference, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["upsample x2", "conv 3x3"])
def test_bf16_autocast_returns_gradients_in_the_parameters_dtype(kind):
    module = MODULES[kind](16)
    x = torch.randn(2, 16, 6, 6)
    grad_out = torch.randn(2, module.out_channels, *output_size(module, 6, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x.requires_grad_())
    assert out.dtype == torch.bfloat16
    out.backward(grad_out.bfloat16())
    assert x.grad.dtype == module.weight.grad.dtype == module.bias.grad.dtype == torch.float32
    reference = grads(reference_of(module), x, grad_out)
    for ours, theirs in zip([x.grad, module.weight.grad, module.bias.grad], reference[1:], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0.05, atol=0.05 * theirs.abs().max().item())


def test_frozen_input_gets_no_gradient_and_the_taps_and_merge_use_them():
    for module in (PatchUpsample(4), SameConv2d(4, 4)):
        module(torch.randn(1, 4, 3, 3)).sum().backward()  # input without grad: only the parameters get one
        assert module.weight.grad is not None and module.bias.grad is not None
    four_times = pyramid_tap(16, 4, 32)
    assert [type(m) for m in four_times if isinstance(m, nn.ConvTranspose2d)] == [PatchUpsample] * 2
    assert isinstance(pyramid_tap(16, 8, 32), PatchUpsample)
    projection = merge_projection("simple_fpn", 64, 96, largest=False)
    assert [type(m) for m in projection.modules() if isinstance(m, nn.Conv2d)] == [SameConv2d] * 2
    assert set(projection.state_dict()) == set(
        nn.Sequential(
            nn.Sequential(reference_of(projection[0][0]), *projection[0][1:]), projection[1]
        ).state_dict()
    )


def test_an_even_kernel_is_refused():
    with pytest.raises(ValueError, match="kernel size must be odd, got 2"):
        SameConv2d(4, 4, 2)
