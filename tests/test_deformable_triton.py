"""The Triton deformable sampler against the PyTorch one (`F.grid_sample`), on CPU tensors under Triton's
interpreter: outputs and the gradients w.r.t. value, locations and weights; odd map sizes, 1 and 3
levels, P = 1 and 4, head dims 8 and 12 (not a power of two), points outside the maps, fp32 / bf16 /
fp16 inputs, and `gradcheck` in float64 (the kernels accumulate in float64 for float64 inputs).

TRITON_INTERPRET=1 only works when set before Triton is first imported, and it then holds for the whole
process (every later Triton kernel, e.g. torch.compile's on a GPU, would be interpreted too). So unless the
session already runs under it, these tests skip in-process and `test_under_interpreter_subprocess` runs
this file in a fresh process with the variable set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from piip.models.backbone import deformable  # noqa: E402
from piip.models.backbone.deformable import DeformableAttention, multi_scale_deformable_sample  # noqa: E402
from piip.models.backbone.deformable_triton import (  # noqa: E402
    multi_scale_deformable_sample_triton,
    triton_available,
)

INTERPRETED = triton_available("cpu")
interpreter = pytest.mark.skipif(
    not INTERPRETED,
    reason="needs TRITON_INTERPRET=1 before Triton's import; run in a fresh process by "
    "test_under_interpreter_subprocess",
)


@pytest.mark.skipif(INTERPRETED, reason="this process already runs Triton's interpreter")
def test_under_interpreter_subprocess() -> None:
    """This file's interpreter tests, in a fresh Python whose Triton imports with TRITON_INTERPRET=1."""
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-p", "no:cacheprovider"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary


def make_inputs(
    shapes: list[tuple[int, int]],
    B: int = 2,
    Nq: int = 7,
    heads: int = 2,
    d: int = 8,
    P: int = 4,
    dtype: torch.dtype = torch.float32,
    cluster: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (value, locations, weights) needing grad. value is a non-contiguous view; locations span
    [-0.25, 1.25] (corners and whole points outside the maps), with a few far outside; `cluster` puts
    all queries on the same few points, so that the backward's atomic adds collide."""
    L, S = len(shapes), sum(H * W for H, W in shapes)
    value = torch.randn(B, heads, S, d).transpose(1, 2)
    locations = torch.rand(B, Nq, heads, L, P, 2) * 1.5 - 0.25
    if cluster:
        locations = locations[:, :1].expand(-1, Nq, -1, -1, -1, -1).clone()
    else:
        locations[0, 0, 0, 0, 0] = torch.tensor([-3.0, 0.5])
        locations[-1, -1, -1, -1, -1] = torch.tensor([0.5, 7.0])
    weights = torch.rand(B, Nq, heads, L, P)
    return tuple(t.to(dtype).requires_grad_() for t in (value, locations, weights))


def outputs_and_grads(
    sampler, inputs: tuple[torch.Tensor, ...], shapes: list[tuple[int, int]], grad_out: torch.Tensor
) -> list[torch.Tensor]:
    """[out, d value, d locations, d weights] of `sampler` for the upstream gradient `grad_out`."""
    out = sampler(inputs[0], shapes, inputs[1], inputs[2])
    return [out, *torch.autograd.grad(out, inputs, grad_out.to(out.dtype))]


NAMES = ("out", "value", "locations", "weights")
CASES = {
    "1 level 5x7, P=1, d=8": dict(shapes=[(5, 7)], P=1, d=8),
    "1 level 3x2, P=4, d=12": dict(shapes=[(3, 2)], P=4, d=12),
    "3 levels, P=4, d=12": dict(shapes=[(5, 7), (3, 2), (2, 4)], P=4, d=12),
    "3 levels, P=1, d=8, 1x1 level": dict(shapes=[(3, 2), (5, 7), (1, 1)], P=1, d=8),
    "3 levels, P=4, d=8, colliding points": dict(shapes=[(5, 7), (3, 2), (2, 4)], P=4, d=8, cluster=True),
}


@interpreter
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_matches_torch_float32(case: dict) -> None:
    case = dict(case)
    shapes = case.pop("shapes")
    inputs = make_inputs(shapes, **case)
    B, Nq, heads, d = inputs[0].shape[0], inputs[1].shape[1], inputs[0].shape[2], inputs[0].shape[3]
    grad_out = torch.randn(B, Nq, heads * d)
    expected = outputs_and_grads(multi_scale_deformable_sample, inputs, shapes, grad_out)
    actual = outputs_and_grads(multi_scale_deformable_sample_triton, inputs, shapes, grad_out)
    for name, a, e in zip(NAMES, actual, expected, strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype: torch.dtype) -> None:
    """bf16 / fp16 inputs: results in the inputs' dtype (as the torch path), values within the dtype's
    rounding of the float32 op on the same (rounded) inputs, since the kernels accumulate in float32."""
    shapes = [(5, 7), (3, 2), (2, 4)]
    inputs = make_inputs(shapes, P=4, d=12, dtype=dtype)
    grad_out = torch.randn(2, 7, 2 * 12).to(dtype)
    as_float = tuple(t.detach().float().requires_grad_() for t in inputs)
    expected = outputs_and_grads(multi_scale_deformable_sample, as_float, shapes, grad_out.float())
    actual = outputs_and_grads(multi_scale_deformable_sample_triton, inputs, shapes, grad_out)
    torch_path = outputs_and_grads(multi_scale_deformable_sample, inputs, shapes, grad_out)
    eps = torch.finfo(dtype).eps
    for name, a, e, t in zip(NAMES, actual, expected, torch_path, strict=True):
        assert a.dtype == t.dtype == dtype, name
        scale = e.abs().max().item()
        torch.testing.assert_close(
            a.float(), e, atol=2 * eps * scale, rtol=2 * eps, msg=lambda m, name=name: f"{name}: {m}"
        )


@interpreter
def test_gradcheck_float64() -> None:
    """Exact first derivatives (away from pixel boundaries, where bilinear sampling has kinks)."""
    shapes = [(3, 2), (2, 3)]
    value, locations, weights = (
        t.detach().double().requires_grad_() for t in make_inputs(shapes, B=1, Nq=2, heads=2, d=3, P=2)
    )
    sampler = lambda v, loc, w: multi_scale_deformable_sample_triton(v, shapes, loc, w)
    assert torch.autograd.gradcheck(sampler, (value, locations, weights), fast_mode=True)
    out = sampler(value, locations, weights)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, multi_scale_deformable_sample(value, shapes, locations, weights))


@pytest.mark.slow
@interpreter
def test_gradcheck_float64_full() -> None:
    """The full (column by column) numerical Jacobian: ~15 s under the interpreter. Run with
    `TRITON_INTERPRET=1 pytest tests/test_deformable_triton.py -m slow`."""
    shapes = [(3, 2), (2, 3)]
    inputs = tuple(
        t.detach().double().requires_grad_() for t in make_inputs(shapes, B=1, Nq=2, heads=2, d=3, P=2)
    )
    sampler = lambda v, loc, w: multi_scale_deformable_sample_triton(v, shapes, loc, w)
    assert torch.autograd.gradcheck(sampler, inputs)


@interpreter
def test_deformable_attention_with_triton_sampler() -> None:
    """DINO-style attention over 3 levels with box references: same output and parameter gradients with
    `model.deformable_backend` torch and triton."""
    shapes = [(5, 7), (3, 2), (2, 4)]
    attention = DeformableAttention(dim=32, dim_feat=24, num_heads=2, num_points=4, ratio=0.5, num_levels=3)
    with torch.no_grad():
        for linear in (attention.sampling_offsets, attention.attention_weights):
            linear.weight.normal_(0, 0.1)
    query, feat = torch.randn(2, 6, 32), torch.randn(2, sum(H * W for H, W in shapes), 24)
    boxes = torch.cat([torch.rand(2, 6, 3, 2), torch.rand(2, 6, 3, 2) * 0.5 + 0.1], -1)
    results = []
    for backend in ("torch", "triton"):
        deformable.set_deformable_backend(attention, backend)
        assert deformable.sampler_for(backend, query.device).__name__.endswith(
            "_triton" if backend == "triton" else "_sample"
        )
        attention.zero_grad()
        out = attention.attend(query, boxes, feat, shapes)
        out.square().sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in attention.parameters()])
    for expected, actual in zip(*results, strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_triton_available() -> None:
    assert triton_available("cpu") == INTERPRETED
    assert triton_available(torch.device("cuda")) == torch.cuda.is_available()
    assert not triton_available("meta")


@pytest.mark.skipif(INTERPRETED, reason="CPU tensors do run under the interpreter")
def test_cpu_without_interpreter_is_refused() -> None:
    value, locations, weights = make_inputs([(5, 7)], P=1)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        multi_scale_deformable_sample_triton(value, [(5, 7)], locations, weights)


def test_rejects_mismatched_inputs() -> None:
    value, locations, weights = make_inputs([(5, 7)], P=1)
    with pytest.raises(ValueError, match="shapes"):
        multi_scale_deformable_sample_triton(value, [(5, 6)], locations, weights)
    with pytest.raises(ValueError, match="shapes"):
        multi_scale_deformable_sample_triton(value, [(5, 7), (0, 0)], locations, weights)
    with pytest.raises(ValueError, match="do not match"):
        multi_scale_deformable_sample_triton(value, [(5, 7)], locations, weights[:, :3])
    with pytest.raises(ValueError, match="expected"):
        multi_scale_deformable_sample_triton(value, [(5, 7)], locations[..., 0], weights)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch_cuda(dtype: torch.dtype) -> None:
    """DINO-sized levels on a GPU (compiled kernels, real atomics), against the torch op in float32."""
    shapes = [(64, 48), (32, 24), (16, 12), (8, 6)]
    inputs = tuple(
        t.detach().cuda().requires_grad_()
        for t in make_inputs(shapes, B=2, Nq=300, heads=8, d=32, dtype=dtype)
    )
    grad_out = torch.randn(2, 300, 8 * 32, device="cuda").to(dtype)
    as_float = tuple(t.detach().float().requires_grad_() for t in inputs)
    expected = outputs_and_grads(multi_scale_deformable_sample, as_float, shapes, grad_out.float())
    actual = outputs_and_grads(multi_scale_deformable_sample_triton, inputs, shapes, grad_out)
    eps = max(torch.finfo(dtype).eps, 1e-5)
    for name, a, e in zip(NAMES, actual, expected, strict=True):
        assert a.dtype == dtype, name
        scale = e.abs().max().item()
        torch.testing.assert_close(
            a.float(), e, atol=4 * eps * scale, rtol=4 * eps, msg=lambda m, name=name: f"{name}: {m}"
        )
