"""Deformable cross-attention (Deformable DETR, one feature level) in plain PyTorch via `F.grid_sample`.

Runs on CPU, GPU and under `torch.compile`; no compiled extension. The math always runs in float32 (as
upstream forces for its CUDA op), whatever the autocast or parameter dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def deformable_sample(
    value: torch.Tensor, value_grid: tuple[int, int], locations: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted bilinear samples of `value` at `locations`.

    value: (B, Hk*Wk, heads, d); locations: (B, Nq, heads, P, 2) as (x, y) in [0, 1]
    (pixel centres at (i + 0.5) / size); weights: (B, Nq, heads, P). Returns (B, Nq, heads * d).
    Outside the map samples are zero (`padding_mode='zeros'`, `align_corners=False`).
    """
    B, _, heads, d = value.shape
    Nq, P = locations.shape[1], locations.shape[3]
    value = value.permute(0, 2, 3, 1).reshape(B * heads, d, *value_grid)
    grid = (2 * locations - 1).permute(0, 2, 1, 3, 4).reshape(B * heads, Nq, P, 2)
    samples = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    weights = weights.permute(0, 2, 1, 3).reshape(B * heads, 1, Nq, P)
    out = (samples * weights).sum(-1)  # (B*heads, d, Nq)
    return out.view(B, heads * d, Nq).transpose(1, 2)


def reference_points(grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Cell centres of a query grid as (1, H*W, 2) normalised (x, y)."""
    H, W = grid
    ys = (torch.arange(H, device=device, dtype=torch.float32) + 0.5) / H
    xs = (torch.arange(W, device=device, dtype=torch.float32) + 0.5) / W
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1)[None]


class DeformableAttention(nn.Module):
    """Queries attend to `num_points` learned offsets around their own position in the key map.

    Values are projected to `int(dim * ratio)` channels (upstream's `deform_ratio`), from a key map of width
    `dim_feat`; parameter names follow Deformable DETR's `MSDeformAttn`.
    """

    def __init__(self, dim: int, dim_feat: int, num_heads: int = 16, num_points: int = 4, ratio: float = 0.5):
        super().__init__()
        value_dim = int(dim * ratio)
        if dim % num_heads or value_dim % num_heads:
            raise ValueError(
                f"deformable attention: dim {dim} and value dim {value_dim} (= dim * ratio {ratio}) must be "
                f"divisible by num_heads {num_heads}"
            )
        self.dim, self.num_heads, self.num_points, self.value_dim = dim, num_heads, num_points, value_dim
        self.sampling_offsets = nn.Linear(dim, num_heads * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_points)
        self.value_proj = nn.Linear(dim_feat, value_dim)
        self.output_proj = nn.Linear(value_dim, dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable DETR init: zero offset weights, per-head directions 1..P pixels out, uniform weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.num_heads, dtype=torch.float32) * (2 * math.pi / self.num_heads)
        directions = torch.stack([theta.cos(), theta.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        scale = torch.arange(1, self.num_points + 1, dtype=torch.float32)[None, :, None]
        self.sampling_offsets.bias.copy_((directions[:, None, :] * scale).flatten())
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
        """query (B, Hq*Wq, dim), feat (B, Hk*Wk, dim_feat) -> (B, Hq*Wq, dim) in float32."""
        device_type = "cpu" if query.device.type == "meta" else query.device.type
        with torch.autocast(device_type, enabled=False):
            linear = lambda layer, x: F.linear(x.float(), layer.weight.float(), layer.bias.float())
            B, Nq, _ = query.shape
            h, P = self.num_heads, self.num_points
            value = linear(self.value_proj, feat).view(B, -1, h, self.value_dim // h)
            offsets = linear(self.sampling_offsets, query).view(B, Nq, h, P, 2)
            weights = linear(self.attention_weights, query).view(B, Nq, h, P).softmax(-1)
            normaliser = torch.tensor([feat_grid[1], feat_grid[0]], device=query.device, dtype=torch.float32)
            ref = reference_points(query_grid, query.device)
            locations = ref[:, :, None, None, :] + offsets / normaliser
            out = deformable_sample(value, feat_grid, locations, weights)
            return linear(self.output_proj, out)
