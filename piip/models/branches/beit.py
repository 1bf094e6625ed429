"""BEiT(v2) branches: a ViT adapter over timm's `Beit`, with relative position bias instead of pos-embeds."""

from __future__ import annotations

import timm

from piip.models.backbone.config import BranchSpec
from piip.models.branches.vit import ViTBranch


class BeitBranch(ViTBranch):
    """timm BEiT(v2): no absolute position embedding, per-block relative position bias resampled to each
    window (or to the whole grid for global blocks)."""

    family = "beit"
    timm_filter = staticmethod(timm.models.beit.checkpoint_filter_fn)

    def __init__(self, spec: BranchSpec, *, use_cls_token: bool = False, **kwargs) -> None:
        # Dense tasks only: relative position bias is defined on the patch grid, so the cls token is not used.
        super().__init__(spec, use_cls_token=False, **kwargs)
