"""Multi-scale deformable sampling as two Triton kernels: the same op as
`deformable.multi_scale_deformable_sample` (bilinear, zeros padding, `align_corners=False`), but without
materialising the (B*heads, d, Nq, P) samples that `F.grid_sample` writes per level.

Forward: one program per (block of queries, batch, head) accumulates weight x bilinear sample over all
levels and points in registers (float32, or float64 for float64 inputs so that `gradcheck` can run).
Backward: the same walk; grad_value by atomic adds into a float32 buffer (several queries hit one
pixel), grad_locations and grad_weights written directly (each point belongs to one program).

CPU tensors run under Triton's interpreter only: TRITON_INTERPRET=1 must be set before `triton` is first
imported in the process (Triton builds `triton.language`'s own jitted helpers, e.g. `tl.zeros`, in the
mode of that moment), which `triton_available` checks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime import JITFunction
except ImportError:  # the torch sampler stays usable; triton_available() answers False
    triton = tl = JITFunction = None

Shapes = list[tuple[int, int]]
_jit: Callable[[Callable], Any] = triton.jit if triton is not None else (lambda fn: fn)


def _mode() -> str:
    """'compiled' or 'interpreted' (as TRITON_INTERPRET was when triton and this module were imported),
    'mixed' when the two disagree (then no kernel can run), 'missing' without Triton."""
    if triton is None:
        return "missing"
    modes = {not isinstance(fn, JITFunction) for fn in (tl.zeros, _forward_kernel, _backward_kernel)}
    return "mixed" if len(modes) > 1 else ("interpreted" if modes.pop() else "compiled")


def triton_available(device: torch.device | str) -> bool:
    """True where the Triton sampler can run on tensors of `device`: Triton importable and the device
    CUDA (with a GPU present), or CPU with Triton's interpreter (TRITON_INTERPRET=1 set before Triton was
    imported; slow, for tests)."""
    device = torch.device(device)
    mode = _mode()
    if device.type == "cuda":
        return mode in ("compiled", "interpreted") and torch.cuda.is_available()
    return device.type == "cpu" and mode == "interpreted"


@_jit
def _program_tile(Nq, heads, D, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's batch b and head h (grid axis 1), its block of queries (axis 0) and the channels,
    their masks, and each query's flat (b, q, h) row index (int64)."""
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = pid_bh % heads
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    ch = tl.arange(0, BLOCK_D)
    return b, h, ch, q < Nq, ch < D, (b * Nq + q) * heads + h


@_jit
def _level_geometry(start_ptr, shape_ptr, level, ACC: tl.constexpr):
    """A level's first token and its height and width (as ints and in the accumulation dtype)."""
    start = tl.load(start_ptr + level)
    H = tl.load(shape_ptr + 2 * level)
    W = tl.load(shape_ptr + 2 * level + 1)
    return start, H, W, H.to(ACC), W.to(ACC)


@_jit
def _sampling_point(loc_ptr, weight_ptr, point, q_mask, Hf, Wf, ACC: tl.constexpr):
    """A block of sampling points: attention weight, top-left corner pixel (x0, y0) and fractions (fx, fy).

    Pixel centres are at (i + 0.5) / size; clamping only moves points that are wholly outside (all four
    corners masked) and keeps the int conversion in range."""
    lx = tl.load(loc_ptr + 2 * point, mask=q_mask, other=0.0).to(ACC)
    ly = tl.load(loc_ptr + 2 * point + 1, mask=q_mask, other=0.0).to(ACC)
    w = tl.load(weight_ptr + point, mask=q_mask, other=0.0).to(ACC)
    x = tl.minimum(tl.maximum(lx * Wf - 0.5, -2.0), Wf + 1.0)
    y = tl.minimum(tl.maximum(ly * Hf - 0.5, -2.0), Hf + 1.0)
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    return w, x0f.to(tl.int32), y0f.to(tl.int32), x - x0f, y - y0f


@_jit
def _corner(corner: tl.constexpr, x0, y0, fx, fy):
    """Corner 0-3 (top-left, top-right, bottom-left, bottom-right) of the bilinear cell: its pixel
    (cx, cy), its factors (wx, wy) and their signs (sx, sy) as x and y grow."""
    if corner // 2 == 1:
        cy = y0 + 1
        wy = fy
        sy = 1.0
    else:
        cy = y0
        wy = 1.0 - fy
        sy = -1.0
    if corner % 2 == 1:
        cx = x0 + 1
        wx = fx
        sx = 1.0
    else:
        cx = x0
        wx = 1.0 - fx
        sx = -1.0
    return cx, cy, wx, wy, sx, sy


@_jit
def _forward_kernel(
    value_ptr,
    loc_ptr,
    weight_ptr,
    start_ptr,
    shape_ptr,
    out_ptr,
    Nq,
    S,
    heads,
    D,
    L,
    P,
    ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[b, q, h, :] = sum_{l, p} w * bilinear(value_l[b, :, :, h, :], x, y) for a block of queries."""
    b, h, ch, q_mask, ch_mask, row = _program_tile(Nq, heads, D, BLOCK_Q, BLOCK_D)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=ACC)
    for level in range(L):
        start, H, W, Hf, Wf = _level_geometry(start_ptr, shape_ptr, level, ACC)
        for p in range(P):
            point = (row * L + level) * P + p
            w, x0, y0, fx, fy = _sampling_point(loc_ptr, weight_ptr, point, q_mask, Hf, Wf, ACC)
            for corner in tl.static_range(4):
                cx, cy, wx, wy, _, _ = _corner(corner, x0, y0, fx, fy)
                valid = q_mask & (cx >= 0) & (cx < W) & (cy >= 0) & (cy < H)
                token = b * S + start + cy * W + cx
                ptrs = value_ptr + ((token * heads + h) * D)[:, None] + ch[None, :]
                v = tl.load(ptrs, mask=valid[:, None] & ch_mask[None, :], other=0.0).to(ACC)
                acc += (w * wy * wx)[:, None] * v
    out_ptrs = out_ptr + (row * D)[:, None] + ch[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & ch_mask[None, :])


@_jit
def _backward_kernel(
    value_ptr,
    loc_ptr,
    weight_ptr,
    start_ptr,
    shape_ptr,
    grad_out_ptr,
    grad_value_ptr,
    grad_loc_ptr,
    grad_weight_ptr,
    Nq,
    S,
    heads,
    D,
    L,
    P,
    ACC: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Gradients of the forward for a block of queries: with g = grad_out[b, q, h, :] and v_c the four
    corners, d/dw = sum_c wy wx <g, v_c>, d/dx = w W sum_c (+-1) wy <g, v_c> (likewise y),
    d/dvalue_c += w wy wx g."""
    b, h, ch, q_mask, ch_mask, row = _program_tile(Nq, heads, D, BLOCK_Q, BLOCK_D)
    g_ptrs = grad_out_ptr + (row * D)[:, None] + ch[None, :]
    g = tl.load(g_ptrs, mask=q_mask[:, None] & ch_mask[None, :], other=0.0).to(ACC)
    for level in range(L):
        start, H, W, Hf, Wf = _level_geometry(start_ptr, shape_ptr, level, ACC)
        for p in range(P):
            point = (row * L + level) * P + p
            w, x0, y0, fx, fy = _sampling_point(loc_ptr, weight_ptr, point, q_mask, Hf, Wf, ACC)
            grad_w = tl.zeros([BLOCK_Q], dtype=ACC)
            grad_x = tl.zeros([BLOCK_Q], dtype=ACC)
            grad_y = tl.zeros([BLOCK_Q], dtype=ACC)
            for corner in tl.static_range(4):
                cx, cy, wx, wy, sx, sy = _corner(corner, x0, y0, fx, fy)
                valid = q_mask & (cx >= 0) & (cx < W) & (cy >= 0) & (cy < H)
                mask = valid[:, None] & ch_mask[None, :]
                token = b * S + start + cy * W + cx
                offsets = ((token * heads + h) * D)[:, None] + ch[None, :]
                v = tl.load(value_ptr + offsets, mask=mask, other=0.0).to(ACC)
                gv = tl.sum(g * v, axis=1)
                grad_w += wy * wx * gv
                grad_x += sx * wy * gv
                grad_y += sy * wx * gv
                tl.atomic_add(grad_value_ptr + offsets, (w * wy * wx)[:, None] * g, mask=mask, sem="relaxed")
            loc_ty = grad_loc_ptr.dtype.element_ty
            tl.store(grad_weight_ptr + point, grad_w.to(grad_weight_ptr.dtype.element_ty), mask=q_mask)
            tl.store(grad_loc_ptr + 2 * point, (w * Wf * grad_x).to(loc_ty), mask=q_mask)
            tl.store(grad_loc_ptr + 2 * point + 1, (w * Hf * grad_y).to(loc_ty), mask=q_mask)


@functools.lru_cache(maxsize=64)
def _level_tables(shapes: tuple[tuple[int, int], ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Level start offsets (int64) and (H, W) pairs (int32) on `device`, cached per shapes."""
    starts, start = [], 0
    for H, W in shapes:
        starts.append(start)
        start += H * W
    flat = [int(s) for hw in shapes for s in hw]
    return (
        torch.tensor(starts, dtype=torch.int64, device=device),
        torch.tensor(flat, dtype=torch.int32, device=device),
    )


# Elements of a (queries x channels) tile and warps per program. Set from ptxas register counts for sm_90
# (no GPU timing yet): 4 elements a thread keep both kernels free of spills (forward ~108 registers,
# backward ~164) for head dims 8 to 64, fp32 and bf16; 8 a thread spill. Tune on a GPU with
# benchmarks/deformable_backends.py.
TILE_ELEMENTS = 512
NUM_WARPS = 4


def _launch_config(Nq: int, d: int) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_D): all channels of a head in one tile (padded to a power of two, masked), about
    TILE_ELEMENTS per program, fewer queries when there are fewer."""
    block_d = triton.next_power_of_2(d)
    block_q = min(triton.next_power_of_2(max(Nq, 1)), max(1, TILE_ELEMENTS // block_d))
    return block_q, block_d


def _acc_dtype(value: torch.Tensor) -> Any:
    """float64 accumulation for float64 inputs (gradcheck), float32 otherwise."""
    return tl.float64 if value.dtype == torch.float64 else tl.float32


class _MultiScaleDeformableSample(torch.autograd.Function):
    """Autograd wrapper: the forward saves only its inputs; the backward re-walks the points."""

    @staticmethod
    def forward(
        ctx: Any, value: torch.Tensor, shapes: Shapes, locations: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        value, locations, weights = value.contiguous(), locations.contiguous(), weights.contiguous()
        B, S, heads, d = value.shape
        Nq, L, P = locations.shape[1], locations.shape[3], locations.shape[4]
        starts, hw = _level_tables(tuple((int(H), int(W)) for H, W in shapes), value.device)
        out = torch.empty(B, Nq, heads * d, device=value.device, dtype=value.dtype)
        ctx.save_for_backward(value, locations, weights, starts, hw)
        ctx.dims = (B, S, heads, d, Nq, L, P)
        if out.numel() == 0:
            return out
        block_q, block_d = _launch_config(Nq, d)
        grid = (triton.cdiv(Nq, block_q), B * heads)
        args = (value, locations, weights, starts, hw, out, Nq, S, heads, d, L, P)
        meta = dict(ACC=_acc_dtype(value), BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=NUM_WARPS)
        _forward_kernel[grid](*args, **meta)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        value, locations, weights, starts, hw = ctx.saved_tensors
        B, S, heads, d, Nq, L, P = ctx.dims
        acc_torch = torch.float64 if value.dtype == torch.float64 else torch.float32
        grad_value = torch.zeros(value.shape, device=value.device, dtype=acc_torch)
        grad_locations = torch.zeros_like(locations)
        grad_weights = torch.zeros_like(weights)
        if grad_out.numel() > 0:
            grad_out = grad_out.contiguous()
            block_q, block_d = _launch_config(Nq, d)
            grid = (triton.cdiv(Nq, block_q), B * heads)
            grads = (grad_out, grad_value, grad_locations, grad_weights)
            args = (value, locations, weights, starts, hw, *grads, Nq, S, heads, d, L, P)
            meta = dict(ACC=_acc_dtype(value), BLOCK_Q=block_q, BLOCK_D=block_d, num_warps=NUM_WARPS)
            _backward_kernel[grid](*args, **meta)
        needs = ctx.needs_input_grad
        return (
            grad_value.to(value.dtype) if needs[0] else None,
            None,
            grad_locations if needs[2] else None,
            grad_weights if needs[3] else None,
        )


def multi_scale_deformable_sample_triton(
    value: torch.Tensor, shapes: Shapes, locations: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Drop-in for `deformable.multi_scale_deformable_sample` (same arguments, result and gradients):
    value (B, sum H_l*W_l, heads, d), shapes [(H_l, W_l)], locations (B, Nq, heads, L, P, 2) as (x, y) in
    [0, 1], weights (B, Nq, heads, L, P) -> (B, Nq, heads * d) in value's dtype; accumulates in float32."""
    if value.dim() != 4 or locations.dim() != 6 or weights.dim() != 5 or locations.shape[-1] != 2:
        raise ValueError(
            "multi_scale_deformable_sample_triton: expected value (B, S, heads, d), locations "
            f"(B, Nq, heads, L, P, 2), weights (B, Nq, heads, L, P); got {tuple(value.shape)}, "
            f"{tuple(locations.shape)}, {tuple(weights.shape)}"
        )
    B, S, heads, _ = value.shape
    if locations.shape[:5] != weights.shape or locations.shape[0] != B or locations.shape[2] != heads:
        raise ValueError(
            f"multi_scale_deformable_sample_triton: locations {tuple(locations.shape)} and weights "
            f"{tuple(weights.shape)} do not match value {tuple(value.shape)}"
        )
    if len(shapes) != locations.shape[3] or sum(int(H) * int(W) for H, W in shapes) != S:
        raise ValueError(
            f"multi_scale_deformable_sample_triton: shapes {list(shapes)} do not match {S} value tokens "
            f"and {locations.shape[3]} levels"
        )
    if not (value.device == locations.device == weights.device):
        raise ValueError("multi_scale_deformable_sample_triton: inputs on different devices")
    if not triton_available(value.device):
        raise RuntimeError(
            f"multi_scale_deformable_sample_triton: Triton cannot run on {value.device.type} tensors here "
            f"(Triton {_mode()}; CUDA, or CPU with TRITON_INTERPRET=1 set before Triton is imported)"
        )
    return _MultiScaleDeformableSample.apply(value, list(shapes), locations, weights)
