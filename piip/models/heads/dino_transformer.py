"""DINO's deformable encoder and decoder (PAPER.md §3.3): the parts between the neck and the class/box heads.

The encoder refines every token of the 4-level feature map with multi-scale deformable self-attention. The
decoder refines queries layer by layer: self-attention among the queries (masked so denoising groups stay
apart), deformable cross-attention into the encoder memory around each query's current box, and an FFN; after
each layer the box head of that layer moves the box (iterative refinement). Layers are post-norm with the
residual added before each norm, as mmdet's `DetrTransformerEncoder`/`DinoTransformerDecoder` compute them,
so converted official weights give the official outputs.

Coordinates: every box and point here is normalised to the image's own (unpadded) size; `valid_ratios`
(unpadded / padded size per level) bring them into each padded feature map, as upstream does.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import MLP

from piip.models.backbone.deformable import DeformableAttention, Shapes
from piip.models.heads.dino_denoising import inverse_sigmoid


def sine_position_encoding(padding: torch.Tensor, num_feats: int, temperature: float) -> torch.Tensor:
    """DETR's normalised sine encoding of a padded map: padding (B, H, W) True outside the image ->
    (B, 2 * num_feats, H, W), y features then x features, each interleaving sin and cos."""
    inside = (~padding).float()
    y = inside.cumsum(1)
    x = inside.cumsum(2)
    y = y / (y[:, -1:, :] + 1e-6) * (2 * math.pi)
    x = x / (x[:, :, -1:] + 1e-6) * (2 * math.pi)
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=padding.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    pos = [_interleave(coord[..., None] / dim_t) for coord in (y, x)]
    return torch.cat(pos, dim=-1).permute(0, 3, 1, 2)


def box_sine_embedding(boxes: torch.Tensor, num_feats: int) -> torch.Tensor:
    """(B, N, 4) normalised (cx, cy, w, h) -> (B, N, 4 * num_feats) in the order y, x, w, h (temperature
    10000): the positional query of a decoder box (DINO's `gen_sineembed_for_position`)."""
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = 10000 ** (2 * (dim_t // 2) / num_feats)
    scaled = boxes.float() * (2 * math.pi)
    parts = [_interleave(scaled[..., i, None] / dim_t) for i in (1, 0, 2, 3)]
    return torch.cat(parts, dim=-1)


def _interleave(angles: torch.Tensor) -> torch.Tensor:
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


def ffn(dim: int, hidden: int) -> tuple[nn.Linear, nn.Linear]:
    return nn.Linear(dim, hidden), nn.Linear(hidden, dim)


class EncoderLayer(nn.Module):
    """Deformable self-attention over all levels, then an FFN; post-norm."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int) -> None:
        super().__init__()
        self.self_attn = DeformableAttention(
            dim, dim, num_heads, num_points, ratio=1.0, num_levels=num_levels
        )
        self.norm1 = nn.LayerNorm(dim)
        self.linear1, self.linear2 = ffn(dim, ffn_dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        reference: torch.Tensor,
        shapes: Shapes,
        padding: torch.Tensor,
    ) -> torch.Tensor:
        attended = self.self_attn.attend(x + pos, reference, x, shapes, padding)
        x = self.norm1(x + attended.to(x.dtype))
        return self.norm2(x + self.linear2(self.linear1(x).relu()))


class DecoderLayer(nn.Module):
    """Self-attention among queries (`attn_mask` keeps denoising groups apart), deformable cross-attention
    into the memory around each query's box, an FFN; post-norm."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, ffn_dim: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = DeformableAttention(
            dim, dim, num_heads, num_points, ratio=1.0, num_levels=num_levels
        )
        self.norm2 = nn.LayerNorm(dim)
        self.linear1, self.linear2 = ffn(dim, ffn_dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(
        self,
        query: torch.Tensor,
        query_pos: torch.Tensor,
        boxes: torch.Tensor,
        memory: torch.Tensor,
        shapes: Shapes,
        padding: torch.Tensor,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        q = query + query_pos
        attended = self.self_attn(q, q, query, attn_mask=attn_mask, need_weights=False)[0]
        query = self.norm1(query + attended)
        attended = self.cross_attn.attend(query + query_pos, boxes, memory, shapes, padding)
        query = self.norm2(query + attended.to(query.dtype))
        return self.norm3(query + self.linear2(self.linear1(query).relu()))


def run_layer(layer: nn.Module, checkpointed: bool, *args: object) -> torch.Tensor:
    """One layer, recomputed in backward instead of keeping its activations when `checkpointed` (the
    backbone's `grad_checkpointing` switches it for the detector's layers too)."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


class Encoder(nn.Module):
    def __init__(self, num_layers: int, **layer: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(**layer) for _ in range(num_layers))
        self.grad_checkpointing = False

    def forward(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        shapes: Shapes,
        valid_ratios: torch.Tensor,
        padding: torch.Tensor,
    ) -> torch.Tensor:
        """Tokens (B, sum H_l*W_l, dim) with their position + level embedding -> memory of the same shape.
        Each token's reference point is its own cell centre, in every level's padded map."""
        reference = encoder_reference_points(shapes, valid_ratios)
        for layer in self.layers:
            x = run_layer(layer, self.grad_checkpointing, x, pos, reference, shapes, padding)
        return x


def encoder_reference_points(shapes: Shapes, valid_ratios: torch.Tensor) -> torch.Tensor:
    """Cell centres of every level, normalised by the valid part of their own level, then placed in each
    level's padded map: (B, sum H_l*W_l, L, 2)."""
    points = []
    for level, (H, W) in enumerate(shapes):
        ys = (torch.arange(H, dtype=torch.float32, device=valid_ratios.device) + 0.5)[:, None].expand(H, W)
        xs = (torch.arange(W, dtype=torch.float32, device=valid_ratios.device) + 0.5)[None, :].expand(H, W)
        ratio = valid_ratios[:, None, level]  # (B, 1, 2) as (w, h)
        points.append(
            torch.stack(
                [xs.reshape(-1)[None] / (ratio[..., 0] * W), ys.reshape(-1)[None] / (ratio[..., 1] * H)], -1
            )
        )
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


class Decoder(nn.Module):
    """Queries refine their boxes layer by layer; `box_heads[i]` moves the boxes after layer i."""

    def __init__(self, num_layers: int, dim: int, **layer: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(dim=dim, **layer) for _ in range(num_layers))
        self.ref_point_head = MLP(2 * dim, [dim, dim])  # box sine embedding -> positional query
        self.norm = nn.LayerNorm(dim)
        self.dim = dim
        self.grad_checkpointing = False

    def forward(
        self,
        query: torch.Tensor,
        boxes: torch.Tensor,
        memory: torch.Tensor,
        shapes: Shapes,
        valid_ratios: torch.Tensor,
        padding: torch.Tensor,
        attn_mask: torch.Tensor | None,
        box_heads: nn.ModuleList,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """query (B, N, dim) content; boxes (B, N, 4) sigmoid (cx, cy, w, h). Returns each layer's normed
        output and the box each layer's output refines: layer i's input boxes, not detached.

        Look-forward-twice: layer i+1 reads layer i's boxes detached, but the head of layer i+1 refines the
        undetached ones (`references[i + 1]`), so its loss also trains layer i's box head."""
        states, references = [], [boxes]
        ratios = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # (B, 1, L, 4)
        for layer, box_head in zip(self.layers, box_heads, strict=False):
            boxes_in_maps = boxes[:, :, None] * ratios
            query_pos = self.ref_point_head(box_sine_embedding(boxes_in_maps[:, :, 0], self.dim // 2))
            query = run_layer(
                layer,
                self.grad_checkpointing,
                *(query, query_pos.to(query.dtype), boxes_in_maps, memory, shapes, padding, attn_mask),
            )
            refined = (box_head(query.float()) + inverse_sigmoid(boxes)).sigmoid()
            states.append(self.norm(query))
            references.append(refined)
            boxes = refined.detach()
        return states, references[:-1]
