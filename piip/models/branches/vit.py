"""ViT branches: DeiT, DeiT III, AugReg, MAE, DINOv2, CLIP and InternViT-6B, as timm `VisionTransformer`s."""

from __future__ import annotations

import re

import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from piip.errors import ConfigError
from piip.models.backbone.attention import GridAttention
from piip.models.backbone.config import BranchSpec, WindowConfig
from piip.models.branches.base import (
    Branch,
    BranchState,
    drop_path_rates,
    norm_layer,
    resample_grid,
    token_grid,
    unused_by_official,
)
from piip.models.branches.checkpoint import hf_clip_to_timm

_OFFICIAL_LAYER_SCALE = re.compile(r"^blocks\.(\d+)\.gamma_([12])$")  # upstream `vit_models` (DeiT code)
_OFFICIAL_CLIP = "clip_model."  # PIIP-LLaVA's CLIPHFWrapper holds a Hugging Face CLIPVisionTransformer


class ViTBranch(Branch):
    """A timm `VisionTransformer` whose attention is replaced by `GridAttention` (windows, qk-norm over all
    heads for InternViT-6B). Parameter names are timm's, so timm-format checkpoints load directly."""

    family = "vit"
    timm_filter = staticmethod(timm.models.vision_transformer.checkpoint_filter_fn)

    def __init__(
        self,
        spec: BranchSpec,
        *,
        use_cls_token: bool = False,
        window: WindowConfig | None = None,
        img_size: int | None = None,
        attention_backend: str = "sdpa",
    ) -> None:
        super().__init__(spec)
        model = self._create_timm(spec, img_size or spec.pretrain_img_size)
        self._arch = [model]  # unregistered: the timm filter functions read shapes from it
        depth = len(model.blocks)
        windows = [window.window_for_block(i) if window else None for i in range(depth)]
        if use_cls_token and any(windows):
            raise ConfigError(f"branch {spec.name}: window attention cannot be combined with a cls token")
        self.patch_embed = model.patch_embed
        self.pos_embed = model.pos_embed
        self.num_pos_prefix = (
            0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        )
        self.has_cls_token = use_cls_token
        if use_cls_token and model.cls_token is None:
            raise ConfigError(
                f"branch {spec.name}: use_cls_token is set but {spec.timm_model} has no cls token"
            )
        self.cls_token = model.cls_token if use_cls_token else None
        self.norm_pre = getattr(model, "norm_pre", None) or nn.Identity()
        self.blocks = model.blocks
        for block, window, rate in zip(self.blocks, windows, drop_path_rates(spec, depth), strict=True):
            self._adapt_block(block, window, rate, attention_backend)
        self.embed_dim = model.embed_dim
        self.dims = [model.embed_dim] * depth
        self.embed_stride = spec.patch_size
        self.strides = [spec.patch_size] * depth

    def _create_timm(self, spec: BranchSpec, img_size: int) -> nn.Module:
        kwargs = dict(
            img_size=img_size, patch_size=spec.patch_size, num_classes=0, norm_layer=norm_layer(spec)
        )
        kwargs.update(spec.timm_kwargs)
        return timm.create_model(spec.timm_model, pretrained=False, **kwargs)

    def _adapt_block(self, block: nn.Module, window: int | None, drop_path: float, backend: str) -> None:
        block.attn = GridAttention.from_timm(
            block.attn,
            window_size=window,
            window_pad=self.spec.window_pad,
            backend=backend,
            qk_norm=self.spec.qk_norm,
            norm_layer=norm_layer(self.spec),
        )
        block.attn.num_prefix_tokens = 1 if self.has_cls_token else 0
        if self.spec.mlp_activation == "gelu_tanh":
            block.mlp.act = nn.GELU(approximate="tanh")
        block.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        block.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @property
    def pos_embed_grid(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    def embed(self, images: torch.Tensor) -> BranchState:
        x = token_grid(self.patch_embed.proj(images))
        x = self.patch_embed.norm(x)
        prefix = None
        if self.pos_embed is not None:
            grid_pos = self.pos_embed[:, self.num_pos_prefix :].reshape(1, *self.pos_embed_grid, -1)
            x = x + resample_grid(grid_pos, x.shape[1:3]).to(x.dtype)
        if self.cls_token is not None:
            prefix = self.cls_token.expand(x.shape[0], -1, -1)
            if self.num_pos_prefix:
                prefix = prefix + self.pos_embed[:, :1].to(prefix.dtype)
            prefix = self.norm_pre(prefix)
        return BranchState(self.norm_pre(x), prefix)

    def forward_blocks(self, state: BranchState, start: int, end: int) -> BranchState:
        blocks = self.blocks[start : end + 1]
        if state.prefix is None:
            x = state.x
            for block in blocks:
                x = self._run(block, x)
            return BranchState(x)
        B, H, W, C = state.x.shape
        num_prefix = state.prefix.shape[1]
        seq = torch.cat([state.prefix, state.x.reshape(B, H * W, C)], dim=1)
        for block in blocks:
            seq = self._run(block, seq)
        return BranchState(seq[:, num_prefix:].reshape(B, H, W, C), seq[:, :num_prefix])

    def block_index(self, param_name: str) -> int | None:
        if param_name.startswith(("patch_embed.", "norm_pre.")) or param_name in ("pos_embed", "cls_token"):
            return -1
        match = re.match(r"blocks\.(\d+)\.", param_name)
        return int(match.group(1)) if match else None

    def no_weight_decay(self) -> set[str]:
        names = {"pos_embed", "cls_token"}
        names |= {
            n for n, _ in self.named_parameters() if n.endswith(("relative_position_bias_table", "gamma"))
        }
        return names

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state_dict = dict(state_dict)
        kernel = state_dict.get("patch_embed.proj.weight")
        target = self.patch_embed.proj.weight.shape[-2:]
        if kernel is not None and kernel.shape[-2:] != target:
            # 14x14 -> 16x16 patch kernels: plain bicubic resize without rescaling (PAPER.md §1.3)
            state_dict["patch_embed.proj.weight"] = F.interpolate(
                kernel.float(), size=tuple(target), mode="bicubic", align_corners=False
            ).to(kernel.dtype)
        if "pos_embed" in state_dict and self.pos_embed is not None:
            state_dict["pos_embed"] = self._adapt_pos_embed(state_dict["pos_embed"])
        return self.timm_filter(state_dict, self._arch[0])

    def from_official(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Upstream's `vit_models` (DeiT code: `gamma_1/2` layer scale) and `InternViT6B` (timm-like names).

        Position embeddings keep their stored grid (upstream stores them at the branch resolution for
        classification and segmentation, where the model config must then say `pos_embed_at_resolution`).
        Upstream's PIIP forwards never add a position to a cls token: a cls slot in the official table is
        reported unused and piip's slot, if it has one, is zero, which computes the same. PIIP-LLaVA's
        `CLIPHFWrapper` (a Hugging Face CLIP under `clip_model.`) is the exception: see `_from_official_clip`.
        """
        if any(key.startswith(_OFFICIAL_CLIP) for key in state_dict):
            return self._from_official_clip(state_dict)
        out: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            key = _OFFICIAL_LAYER_SCALE.sub(r"blocks.\1.ls\2.gamma", key)
            if key == "pos_embed" and self.pos_embed is not None:
                out.update(self._official_pos_embed(value))
            else:
                out[key] = value
        return out

    def _from_official_clip(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PIIP-LLaVA's `CLIPHFWrapper`: Hugging Face CLIP vision names under `clip_model.` (PAPER.md §6.1).

        Its forward adds the position table's cls slot to the class embedding and reads no
        `post_layernorm`, so the table stays whole (timm's CLIP layout has the same slot) and the final norm
        is reported unused, as is the `position_ids` index buffer older transformers saved."""
        out: dict[str, torch.Tensor] = {}
        hf: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            name = key.removeprefix(_OFFICIAL_CLIP)
            if name == key:
                out[key] = value  # not the wrapper's: the converter lists it
            elif name.startswith("post_layernorm."):
                why = "CLIP's final norm; the tower returns the last block's tokens"
                out[unused_by_official(key, why)] = value
            elif name == "embeddings.position_ids":
                out[unused_by_official(key, "an index buffer (0..N); piip indexes the table itself")] = value
            else:
                hf[name] = value
        return out | hf_clip_to_timm(hf)

    def _official_pos_embed(self, pos: torch.Tensor) -> dict[str, torch.Tensor]:
        grid_tokens = self.pos_embed.shape[1] - self.num_pos_prefix
        has_slot = pos.shape[1] == grid_tokens + 1
        if pos.shape[1] not in (grid_tokens, grid_tokens + 1):
            return {"pos_embed": pos}  # a grid of another size: the converter reports the shape
        out = {}
        grid = pos[:, 1:] if has_slot else pos
        if has_slot:
            out[
                unused_by_official("pos_embed[:, 0]", "cls slot; upstream adds no position to a cls token")
            ] = pos[:, :1]
        if self.num_pos_prefix:
            grid = torch.cat([torch.zeros_like(grid[:, :1]), grid], dim=1)
        out["pos_embed"] = grid
        return out

    def _adapt_pos_embed(self, pos: torch.Tensor) -> torch.Tensor:
        """Checkpoint pos-embed (any grid, with or without cls slot) -> this branch's stored layout."""
        tokens = pos.shape[1]
        prefix = next((p for p in (0, 1, 2, 4, 5) if _is_square(tokens - p)), None)
        if prefix is None:
            raise ValueError(
                f"branch {self.name}: cannot read a square grid from pos_embed of {tokens} tokens"
            )
        side = int((tokens - prefix) ** 0.5)
        grid = resample_grid(pos[:, prefix:].reshape(1, side, side, -1), self.pos_embed_grid).flatten(1, 2)
        if self.num_pos_prefix:
            slot = pos[:, :1] if prefix else torch.zeros_like(pos[:, :1])
            grid = torch.cat([slot, grid], dim=1)
        return grid


def _is_square(n: int) -> bool:
    return n > 0 and int(n**0.5) ** 2 == n
