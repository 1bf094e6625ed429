"""Multi-scale deformable attention (Deformable DETR): L feature levels x P points per head, in plain PyTorch
via `F.grid_sample`. The PIIP interactions use one level; DINO's encoder and decoder use four.

Runs on CPU, GPU and under `torch.compile`; no compiled extension. The math always runs in float32 (as
upstream forces for its CUDA op), whatever the autocast or parameter dtype. `SAMPLERS` is the one place a
faster op plugs in (same arguments, same result): `model.deformable_backend` picks the Triton kernel of
`deformable_triton` (auto: on CUDA) or this PyTorch op.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from piip.errors import ConfigError

Shapes = list[tuple[int, int]]


def multi_scale_deformable_sample(
    value: torch.Tensor, shapes: Shapes, locations: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted bilinear samples of L value maps at learned locations, summed over levels and points.

    value: (B, sum_l H_l*W_l, heads, d), the levels' tokens one after the other; shapes: [(H_l, W_l)];
    locations: (B, Nq, heads, L, P, 2) as (x, y) in [0, 1] of each level (pixel centres at (i + 0.5) / size);
    weights: (B, Nq, heads, L, P). Returns (B, Nq, heads * d). Outside a map samples are zero
    (`padding_mode='zeros'`, `align_corners=False`), as the CUDA op of Deformable DETR.
    """
    B, _, heads, d = value.shape
    Nq, P = locations.shape[1], locations.shape[4]
    out = value.new_zeros(B * heads, d, Nq)
    start = 0
    for level, (H, W) in enumerate(shapes):
        level_value = value[:, start : start + H * W].permute(0, 2, 3, 1).reshape(B * heads, d, H, W)
        start += H * W
        # points before queries: the weighted sum over points then runs over whole rows of queries (summed
        # over a last dimension of P = 4, it cost more on CPU than the sampling itself); handed to grid_sample
        # as one row of P * Nq points, which its CPU kernel runs faster than P rows of Nq (this function for
        # 16 heads x 4 points x 9,604 queries, steps interleaved: 14.2 -> 11.1 ms)
        grid = (2 * locations[:, :, :, level] - 1).permute(0, 2, 3, 1, 4).reshape(B * heads, 1, P * Nq, 2)
        samples = F.grid_sample(level_value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        samples = samples.view(B * heads, d, P, Nq)
        level_weights = weights[:, :, :, level].permute(0, 2, 3, 1).reshape(B * heads, 1, P, Nq)
        for point in range(P):
            out = torch.addcmul(out, samples[:, :, point], level_weights[:, :, point])
    # token-major, as the output projection and the residual sums after it expect (a channel-major result
    # would make them channel-major too, and every later LayerNorm copy its input)
    return out.view(B, heads * d, Nq).transpose(1, 2).contiguous()


def deformable_sample(
    value: torch.Tensor, value_grid: tuple[int, int], locations: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """One level: locations (B, Nq, heads, P, 2), weights (B, Nq, heads, P) (see the multi-scale op)."""
    return multi_scale_deformable_sample(value, [value_grid], locations.unsqueeze(3), weights.unsqueeze(3))


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"torch": multi_scale_deformable_sample}
BACKENDS = ("auto", "torch", "triton")


def sampler_for(backend: str, device: torch.device) -> Callable[..., torch.Tensor]:
    """The op `model.deformable_backend` names for tensors on `device`: `auto` takes the Triton kernel on CUDA
    when Triton imports, the PyTorch op otherwise; `triton` insists (on CPU only under TRITON_INTERPRET=1)."""
    key = (backend, device.type)
    if key not in _CHOSEN:
        _CHOSEN[key] = _choose_sampler(*key)
    return _CHOSEN[key]


# Decided once per backend and device type (every attention call asks; Triton's mode is fixed at its import);
# a refusal is not stored, it raises again. A plain dict, not functools.cache: torch.compile reads it as a
# guarded constant, where it would trace through (and warn about) a cache wrapper.
_CHOSEN: dict[tuple[str, str], Callable[..., torch.Tensor]] = {}


def _choose_sampler(backend: str, device_type: str) -> Callable[..., torch.Tensor]:
    device = torch.device(device_type)
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return SAMPLERS["torch"]
    try:
        from piip.models.backbone.deformable_triton import (
            multi_scale_deformable_sample_triton,
            triton_available,
        )
    except ImportError as err:
        if backend == "auto":
            return SAMPLERS["torch"]
        raise ConfigError(f"model.deformable_backend=triton: Triton does not import ({err})") from err
    if not triton_available(device):
        if backend == "auto":
            return SAMPLERS["torch"]
        raise ConfigError(
            f"model.deformable_backend=triton: Triton cannot run on {device.type} tensors (CUDA, or CPU with "
            "TRITON_INTERPRET=1); use auto or torch"
        )
    return SAMPLERS.setdefault("triton", multi_scale_deformable_sample_triton)


def set_deformable_backend(module: nn.Module, backend: str) -> None:
    """Every deformable attention inside `module` samples with `backend` (one of BACKENDS)."""
    if backend not in BACKENDS:
        raise ConfigError(f"model.deformable_backend: expected one of {list(BACKENDS)}, got {backend!r}")
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as err:
            raise ConfigError(f"model.deformable_backend=triton: Triton does not import ({err})") from err
    for child in module.modules():
        if isinstance(child, DeformableAttention):
            child.backend = backend


def reference_points(grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Cell centres of a query grid as (1, H*W, 2) normalised (x, y)."""
    H, W = grid
    ys = (torch.arange(H, device=device, dtype=torch.float32) + 0.5) / H
    xs = (torch.arange(W, device=device, dtype=torch.float32) + 0.5) / W
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)[None]


class DeformableAttention(nn.Module):
    """Queries attend to `num_points` learned offsets per level around their reference point in each of
    `num_levels` key maps, with one softmax over all levels and points of a head.

    Values are projected to `int(dim * ratio)` channels (upstream's `deform_ratio`), from key maps of width
    `dim_feat`; parameter names follow Deformable DETR's `MSDeformAttn`. `forward` is the PIIP interaction
    (one level, queries on a grid); `attend` is the general form (DINO).
    """

    def __init__(
        self,
        dim: int,
        dim_feat: int,
        num_heads: int = 16,
        num_points: int = 4,
        ratio: float = 0.5,
        num_levels: int = 1,
    ):
        super().__init__()
        value_dim = int(dim * ratio)
        if dim % num_heads or value_dim % num_heads:
            raise ValueError(
                f"deformable attention: dim {dim} and value dim {value_dim} (= dim * ratio {ratio}) must be "
                f"divisible by num_heads {num_heads}"
            )
        self.dim, self.num_heads, self.num_points, self.value_dim = dim, num_heads, num_points, value_dim
        self.num_levels = num_levels
        self.backend = "auto"  # model.deformable_backend, set by set_deformable_backend
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim_feat, value_dim)
        self.output_proj = nn.Linear(value_dim, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable DETR init: zero offset weights, per-head directions 1..P pixels out on every level,
        uniform weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.num_heads, dtype=torch.float32) * (2 * math.pi / self.num_heads)
        directions = torch.stack([theta.cos(), theta.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        scale = torch.arange(1, self.num_points + 1, dtype=torch.float32)[None, None, :, None]
        grid = directions[:, None, None, :] * scale  # (heads, 1, P, 2): the same on every level
        self.sampling_offsets.bias.copy_(grid.expand(-1, self.num_levels, -1, -1).flatten())
        for linear in (self.attention_weights,):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        for linear in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(
        self,
        query: torch.Tensor,
        query_grid: tuple[int, int],
        feat: torch.Tensor,
        feat_grid: tuple[int, int],
    ) -> torch.Tensor:
        """PIIP's interaction: query (B, Hq*Wq, dim) on a grid, feat (B, Hk*Wk, dim_feat) one level ->
        (B, Hq*Wq, dim) in float32; each query's reference point is its own cell centre."""
        ref = reference_points(query_grid, query.device)[:, :, None, :]  # (1, Nq, 1 level, 2)
        return self.attend(query, ref.expand(query.shape[0], -1, -1, -1), feat, [feat_grid])

    def attend(
        self,
        query: torch.Tensor,
        reference: torch.Tensor,
        feat: torch.Tensor,
        shapes: Shapes,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query (B, Nq, dim); reference (B, Nq, L, 2) normalised (x, y) points per level, or (B, Nq, L, 4)
        boxes (cx, cy, w, h), whose offsets are then fractions of half the box over P points (the two-stage
        decoder of Deformable DETR and DINO); feat (B, sum H_l*W_l, dim_feat) holding the levels of `shapes`
        one after the other; padding_mask (B, sum H_l*W_l), True at padding, whose values read as zero ->
        (B, Nq, dim) in float32."""
        if len(shapes) != self.num_levels:
            raise ValueError(f"deformable attention built for {self.num_levels} levels, got {len(shapes)}")
        device_type = "cpu" if query.device.type == "meta" else query.device.type
        with torch.autocast(device_type, enabled=False):
            linear = lambda layer, x: F.linear(x.float(), layer.weight.float(), layer.bias.float())
            B, Nq, _ = query.shape
            h, L, P = self.num_heads, self.num_levels, self.num_points
            value = linear(self.value_proj, feat)
            if padding_mask is not None:
                value = value.masked_fill(padding_mask[..., None], 0.0)
            value = value.view(B, -1, h, self.value_dim // h)
            offsets = linear(self.sampling_offsets, query).view(B, Nq, h, L, P, 2)
            logits = linear(self.attention_weights, query).view(B, Nq, h, L * P)
            # one softmax over a head's L*P points, computed with the queries innermost (the CPU kernel
            # then vectorises across queries: 3x faster than over a last dimension of 4-16), handed on as a
            # (B, Nq, h, L, P) view of that layout, which the sampler reads without a copy
            weights = logits.permute(0, 2, 3, 1).softmax(2).reshape(B, h, L, P, Nq).permute(0, 4, 1, 2, 3)
            reference = reference.float()[:, :, None, :, None, :]  # (B, Nq, 1, L, 1, 2 or 4)
            if reference.shape[-1] == 4:
                locations = reference[..., :2] + offsets * (reference[..., 2:] * (0.5 / P))
            else:
                size = torch.tensor([[w, h_] for h_, w in shapes], device=query.device, dtype=torch.float32)
                locations = reference + offsets / size[None, None, None, :, None]
            sample = sampler_for(self.backend, value.device)
            out = sample(value, shapes, locations, weights)
            return linear(self.output_proj, out)
