"""BEiT(v2) branches: a ViT adapter over timm's `Beit`, with relative position bias instead of pos-embeds.

Each block holds its relative-position table at its own window, ((2w-1)^2, heads) with no cls-token rows,
as upstream's module does (PAPER.md §3.1). Pretrained 224 files hold (27^2 + 3)-row tables; loading drops
the 3 cls rows and resamples the rest as upstream's loader does (`resample_rel_pos_table`).
"""

from __future__ import annotations

import math
import re
from itertools import accumulate

import numpy as np
import timm
import torch

from piip.models.backbone.config import BranchSpec
from piip.models.branches.base import unused_by_official
from piip.models.branches.vit import ViTBranch

StateDict = dict[str, torch.Tensor]
CLS_ROWS = 3  # BEiT's cls->token, token->cls and cls->cls entries after the (2w-1)^2 grid
_TABLE = "relative_position_bias_table"
_SHARED_TABLE = f"rel_pos_bias.{_TABLE}"


def table_side(rows: int) -> tuple[int, bool]:
    """Side (2w-1) of a table with `rows` rows, and whether it carries the 3 cls-token rows."""
    for extra in (0, CLS_ROWS):
        side = math.isqrt(rows - extra)
        if side * side == rows - extra and side % 2 == 1:
            return side, bool(extra)
    raise ValueError(f"a relative position table of {rows} rows is neither (2w-1)^2 nor (2w-1)^2 + 3")


def _progression_offsets(src_half: int, dst_half: int) -> list[float]:
    """Distances 1, 1+q, 1+q+q^2, ... of the `src_half` source entries on one side of 0, with the ratio q
    found by bisection (as BEiT does) so that the outermost lands near `dst_half`."""
    left, right = 1.01, 1.5
    ratio = left
    while right - left > 1e-6:
        ratio = (left + right) / 2.0
        if (1.0 - ratio**src_half) / (1.0 - ratio) > dst_half:
            right = ratio
        else:
            left = ratio
    return list(accumulate(ratio**i for i in range(src_half)))


def resample_rel_pos_table(table: torch.Tensor, window: int) -> torch.Tensor:
    """A BEiT table ((2s-1)^2 [+3], heads) -> ((2w-1)^2, heads) for window `w`, as BEiT's loader does.

    Why not bicubic: BEiT places the source entries on a geometric-progression grid (dense near 0, sparse
    far away) and fits an interpolating bicubic spline through them (scipy's `interp2d(kind='cubic')`,
    which is `RectBivariateSpline(s=0)`); the detection weights were trained from tables made that way.
    The cls-token rows are dropped, as upstream does.
    """
    from scipy.interpolate import RectBivariateSpline

    src, has_cls = table_side(table.shape[0])
    grid = table[: src * src] if has_cls else table
    dst = 2 * window - 1
    if src == dst:
        return grid.clone()
    offsets = _progression_offsets(src // 2, dst // 2)
    coords = np.array([-d for d in reversed(offsets)] + [0.0] + offsets)
    targets = np.arange(-(dst // 2), dst // 2 + 1, dtype=np.float64)
    heads = []
    for head in grid.float().T.reshape(-1, src, src).numpy():
        spline = RectBivariateSpline(coords, coords, head.astype(np.float64), kx=3, ky=3, s=0)
        heads.append(torch.from_numpy(spline(targets, targets)).reshape(-1))
    return torch.stack(heads, dim=1).to(table.dtype)


def beit_official_to_timm(state_dict: StateDict) -> StateDict:
    """Keys of upstream's mmdet `BEiT` module -> this branch's: the same names (upstream kept BEiT's) and
    window-sized tables; its `relative_position_index` buffers are reported, as piip derives them."""
    why = "buffer derived from the window; piip computes the same index"
    return {
        unused_by_official(k, why) if k.endswith("relative_position_index") else k: v
        for k, v in state_dict.items()
    }


class BeitBranch(ViTBranch):
    """timm BEiT(v2): no absolute position embedding, a relative position bias table per block sized for the
    block's window (global blocks: for the grid of the pretrained image size, resampled on the fly to other
    grids)."""

    family = "beit"
    timm_filter = staticmethod(timm.models.beit.checkpoint_filter_fn)

    def __init__(self, spec: BranchSpec, *, use_cls_token: bool = False, **kwargs) -> None:
        # Dense tasks only: relative position bias is defined on the patch grid, so the cls token is not used.
        super().__init__(spec, use_cls_token=False, **kwargs)

    def adapt_state_dict(self, state_dict: StateDict) -> StateDict:
        """timm / BEiT release naming -> this branch, tables resampled to each block's window."""
        state_dict = dict(state_dict)
        shared = state_dict.pop(_SHARED_TABLE, None)
        if shared is not None:  # BEiT's shared-table variant: every block starts from it, as upstream
            for i in range(len(self.blocks)):
                state_dict.setdefault(f"blocks.{i}.attn.{_TABLE}", shared)
        tables = {k: state_dict.pop(k) for k in list(state_dict) if k.endswith(_TABLE)}
        state_dict = {k: v for k, v in state_dict.items() if not k.endswith("relative_position_index")}
        out = super().adapt_state_dict(state_dict)  # timm's filter cannot size tables for GridAttention
        for key, table in tables.items():
            match = re.fullmatch(rf"blocks\.(\d+)\.attn\.{_TABLE}", key)
            if match is None or int(match.group(1)) >= len(self.blocks):
                out[key] = table  # not ours: reported as unused
                continue
            out[key] = resample_rel_pos_table(table, self.blocks[int(match.group(1))].attn.rel_pos_window)
        return out

    def from_official(self, state_dict: StateDict) -> StateDict:
        return beit_official_to_timm(state_dict)
