"""Self-attention over a token grid: global or windowed, through SDPA or flash-attn.

`GridAttention` replaces the attention module inside timm blocks. It takes over the timm module's own
parameters (`qkv`, `q_norm`, `k_norm`, `proj`, BEiT's `q_bias`/`v_bias`), so state-dict keys stay those of
timm and pretrained checkpoints load unchanged; BEiT's `relative_position_bias_table` keeps its name but is
sized for the block's window (the BEiT branch resamples pretrained tables to it on loading).

Blocks pass tokens as a `(B, H, W, C)` grid, which is how the attention learns the grid it needs for
windows and relative position bias; `(B, N, C)` sequences (with cls tokens) always attend globally.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

WindowPad = Literal["qkv", "tokens"]
QKNorm = Literal["none", "head", "all"]
AttentionBackend = Literal["sdpa", "flash"]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) with H, W multiples of `window` -> (B * nW, window * window, C)."""
    B, H, W, C = x.shape
    x = x.view(B, H // window, window, W // window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, C)


def window_unpartition(windows: torch.Tensor, window: int, H: int, W: int) -> torch.Tensor:
    """Inverse of `window_partition` for a padded (H, W) grid."""
    C = windows.shape[-1]
    B = windows.shape[0] // ((H // window) * (W // window))
    x = windows.view(B, H // window, W // window, window, window, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, C)


def pad_to_multiple(x: torch.Tensor, window: int) -> torch.Tensor:
    """Zero-pad a (B, H, W, C) grid at the bottom/right to multiples of `window`."""
    H, W = x.shape[1:3]
    pad_h, pad_w = -H % window, -W % window
    return F.pad(x, (0, 0, 0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def relative_position_index(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """Index into a (2h-1)(2w-1) relative-position table for every pair of positions of an h x w grid."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij")
    ).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    return (rel[..., 0] + height - 1) * (2 * width - 1) + (rel[..., 1] + width - 1)


class GridAttention(nn.Module):
    """Multi-head self-attention with optional windows, qk-norm and BEiT relative position bias.

    `window_pad` chooses where window padding happens, which the two upstream ViT families do differently
    and which changes both the numbers (padded keys are zeros or the qkv bias) and the FLOPs:
    `"qkv"` projects the real tokens and pads q/k/v with zeros (DeiT `vit_models`);
    `"tokens"` pads the normalised tokens and projects the padded grid (InternViT class, ViTDet, BEiT).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_norm: QKNorm = "none",
        norm_layer: type[nn.Module] = nn.LayerNorm,
        window_size: int | None = None,
        window_pad: WindowPad = "qkv",
        rel_pos_window: int | None = None,
        backend: AttentionBackend = "sdpa",
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by num_heads {num_heads}")
        if window_pad not in ("qkv", "tokens"):
            raise ValueError(f"window_pad must be 'qkv' or 'tokens', got {window_pad!r}")
        if backend not in ("sdpa", "flash"):
            raise ValueError(f"attention backend must be 'sdpa' or 'flash', got {backend!r}")
        if backend == "flash" and rel_pos_window is not None:
            raise ValueError(
                "the flash attention backend cannot add a relative position bias (BEiT): use 'sdpa'"
            )
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.qk_norm_mode: QKNorm = qk_norm
        self.window_size, self.window_pad, self.backend = window_size, window_pad, backend
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        norm_dim = {"none": None, "head": self.head_dim, "all": dim}[qk_norm]
        self.q_norm = norm_layer(norm_dim) if norm_dim else nn.Identity()
        self.k_norm = norm_layer(norm_dim) if norm_dim else nn.Identity()
        self.q_bias: nn.Parameter | None = None
        self.v_bias: nn.Parameter | None = None
        self.relative_position_bias_table: nn.Parameter | None = None
        self.rel_pos_window = rel_pos_window
        if rel_pos_window is not None:
            # no cls-token rows: upstream's module drops BEiT's 3 extra rows; piip's BEiT has no cls token
            size = (2 * rel_pos_window - 1) ** 2
            self.relative_position_bias_table = nn.Parameter(torch.zeros(size, num_heads))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.num_prefix_tokens = 0  # set by the branch; the paper FLOP protocol ignores prefix tokens

    @classmethod
    def from_timm(cls, attn: nn.Module, **kwargs) -> GridAttention:
        """Build from a timm `Attention` or BEiT `Attention`, adopting its parameters (same key names).

        A BEiT relative-position table is made anew at the block's own window, as upstream's module holds
        it (pretrained tables are resampled to it when loaded); a global block keeps the grid timm built.
        """
        rel_table = getattr(attn, "relative_position_bias_table", None)
        rel_window = None
        if rel_table is not None:
            rel_window = kwargs.get("window_size") or (math.isqrt(rel_table.shape[0] - 3) + 1) // 2
        q_norm = getattr(attn, "q_norm", nn.Identity())
        new = cls(
            dim=attn.qkv.in_features,
            num_heads=attn.num_heads,
            qkv_bias=attn.qkv.bias is not None,
            qk_norm=kwargs.pop("qk_norm", "none" if isinstance(q_norm, nn.Identity) else "head"),
            rel_pos_window=rel_window,
            attn_drop=getattr(attn, "attn_drop", nn.Dropout(0.0)).p,
            **kwargs,
        )
        new.qkv, new.proj, new.proj_drop = attn.qkv, attn.proj, attn.proj_drop
        if new.qk_norm_mode == "head":
            new.q_norm, new.k_norm = attn.q_norm, attn.k_norm
        new.q_bias = getattr(attn, "q_bias", None)
        new.v_bias = getattr(attn, "v_bias", None)
        return new

    # -- pieces -------------------------------------------------------------------------------------------
    def _project_qkv(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_bias is None:
            return self.qkv(x)
        bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        return F.linear(x, self.qkv.weight, bias)

    def _relative_bias(self, height: int, width: int, device: torch.device) -> torch.Tensor | None:
        """BEiT bias for an h x w window or grid, gathered from the table.

        Windows always match the table. A global block on a grid other than the one its table was made
        for (upstream cannot run that case) resamples the table bicubically on the fly.
        """
        if self.relative_position_bias_table is None:
            return None
        size = 2 * self.rel_pos_window - 1
        table = self.relative_position_bias_table.T.reshape(1, self.num_heads, size, size)
        if (2 * height - 1, 2 * width - 1) != (size, size):
            table = F.interpolate(
                table.float(), size=(2 * height - 1, 2 * width - 1), mode="bicubic", align_corners=False
            ).to(table.dtype)
        table = table.reshape(self.num_heads, -1)
        index = relative_position_index(height, width, device)
        return table[:, index].unsqueeze(0)  # (1, heads, N, N)

    def _attend(self, qkv: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """(B', N, 3C) projected tokens -> (B', N, C) attention output (before `proj`)."""
        B, N, _ = qkv.shape
        q, k, v = qkv.unflatten(-1, (3, self.dim)).unbind(2)
        if self.qk_norm_mode == "all":  # InternViT: one norm over all heads
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)) for t in (q, k, v))  # B, N, h, d
        if self.qk_norm_mode == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        dropout = self.attn_drop if self.training else 0.0
        if self.backend == "flash" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            from flash_attn import flash_attn_func  # optional extra: pip install piip[flash]

            out = flash_attn_func(q, k, v, dropout_p=dropout)
        else:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=None if bias is None else bias.to(q.dtype),
                dropout_p=dropout,
            ).transpose(1, 2)
        return out.reshape(B, N, self.dim)

    # -- forward ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, **_: object) -> torch.Tensor:
        """`x`: a (B, H, W, C) grid or a (B, N, C) sequence; other timm block arguments are ignored."""
        if x.ndim == 3:
            if self.window_size is not None:
                raise ValueError(
                    "window attention needs a token grid; prefix (cls) tokens only attend globally"
                )
            return self.proj_drop(self.proj(self._attend(self._project_qkv(x), None)))
        B, H, W, C = x.shape
        w = self.window_size
        if w is None:
            out = self._attend(self._project_qkv(x.reshape(B, H * W, C)), self._relative_bias(H, W, x.device))
            return self.proj_drop(self.proj(out.view(B, H, W, C)))
        if self.window_pad == "tokens":
            padded = pad_to_multiple(x, w)
            qkv = self._project_qkv(window_partition(padded, w))
        else:
            padded = pad_to_multiple(self._project_qkv(x), w)
            qkv = window_partition(padded, w)
        out = self._attend(qkv, self._relative_bias(w, w, x.device))
        out = window_unpartition(out, w, padded.shape[1], padded.shape[2])[:, :H, :W]
        return self.proj_drop(self.proj(out))
