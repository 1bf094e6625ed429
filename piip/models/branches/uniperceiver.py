"""Uni-Perceiver branches: upstream's `UnifiedBertEncoder` (PAPER.md §3.1) as a timm `VisionTransformer`.

What differs from the ViT adapter, all read from upstream's `uniperceiver.py`: no cls token; the patch
tokens get the spatial position embedding (14x14, resampled bicubically) plus frame 0 of an 8-frame
`temporal_pos_embed`, then a LayerNorm (`embeddings_norm`, timm's `norm_pre`); the patch convolution keeps
its bias; layer scale `gamma_1/2` starts at zero. LayerNorm eps 1e-5 and window padding of the normalised
tokens (before the qkv projection) are set by its branch configs; qkv bias, exact GELU and the
1/sqrt(head_dim) attention scale are timm's ViT defaults and upstream's.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from piip.models.backbone.config import BranchSpec
from piip.models.branches.base import BranchState, norm_layer, resample_grid, token_grid
from piip.models.branches.checkpoint import uniperceiver_to_timm
from piip.models.branches.vit import ViTBranch

FRAMES = 8  # upstream's `temporal_pos_embed` rows; an image is frame 0


class UniPerceiverBranch(ViTBranch):
    """A timm ViT laid out as Uni-Perceiver's encoder; checkpoints use `checkpoint_format: uniperceiver`."""

    family = "uniperceiver"

    def __init__(self, spec: BranchSpec, **kwargs) -> None:
        super().__init__(spec, **kwargs)
        # a parameter of its own, as upstream trains it (folding it into pos_embed would change AdamW steps)
        self.temporal_pos_embed = nn.Parameter(torch.zeros(FRAMES, self.embed_dim))

    def _create_timm(self, spec: BranchSpec, img_size: int) -> nn.Module:
        kwargs = dict(
            img_size=img_size,
            patch_size=spec.patch_size,
            num_classes=0,
            norm_layer=norm_layer(spec),
            class_token=False,
            global_pool="",
            init_values=1.0,  # creates the LayerScale modules; zeroed below (timm reads 0 as "none")
        )
        kwargs.update(spec.timm_kwargs)
        model = timm.create_model(spec.timm_model, pretrained=False, **kwargs)
        # `pre_norm=True` would drop the patch-conv bias; upstream has both, so the norm is set here.
        model.norm_pre = norm_layer(spec)(model.embed_dim)
        with torch.no_grad():
            for block in model.blocks:
                block.ls1.gamma.zero_()
                block.ls2.gamma.zero_()
        return model

    def embed(self, images: torch.Tensor) -> BranchState:
        x = token_grid(self.patch_embed.proj(images))
        pos = resample_grid(self.pos_embed.reshape(1, *self.pos_embed_grid, -1), x.shape[1:3])
        x = x + pos.to(x.dtype) + self.temporal_pos_embed[0].to(x.dtype)
        return BranchState(self.norm_pre(x))

    def block_index(self, param_name: str) -> int | None:
        return -1 if param_name == "temporal_pos_embed" else super().block_index(param_name)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"temporal_pos_embed"}

    def from_official(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Upstream's `UnifiedBertEncoder` keys are the release files' keys: one renaming serves both."""
        return uniperceiver_to_timm(state_dict)
