"""mmdet 2.x `mask_rcnn_r50_fpn` head names -> piip's detection task (`detector.*`, torchvision's modules).

The modules are the same layer for layer (FPN with a max-pooled 5th level, one 3x3 conv RPN head, two shared
FCs, four 3x3 convs + deconv + 1x1 mask head); only names and the class order differ. mmdet puts background
*last* in `fc_cls` and has no background rows in `fc_reg` (4 per class) or `conv_logits` (1 per class);
torchvision puts background *first* and keeps 4 box rows and 1 mask channel for it. Background's box and mask
rows are never read (no box or mask is predicted for background), so they are written as zeros.
"""

from __future__ import annotations

import re

import torch

from piip.errors import CheckpointError

StateDict = dict[str, torch.Tensor]
PREFIX = "detector."

_RENAMES = [  # (mmdet, piip) patterns, parameter suffix (`weight` / `bias`) carried over
    (r"neck\.lateral_convs\.(\d+)\.conv\.", r"neck.fpn.inner_blocks.\1.0."),
    (r"neck\.fpn_convs\.(\d+)\.conv\.", r"neck.fpn.layer_blocks.\1.0."),
    (r"rpn_head\.rpn_conv\.", "rpn.head.conv.0.0."),
    (r"rpn_head\.rpn_cls\.", "rpn.head.cls_logits."),
    (r"rpn_head\.rpn_reg\.", "rpn.head.bbox_pred."),
    (r"roi_head\.bbox_head\.shared_fcs\.0\.", "roi_heads.box_head.fc6."),
    (r"roi_head\.bbox_head\.shared_fcs\.1\.", "roi_heads.box_head.fc7."),
    (r"roi_head\.mask_head\.convs\.(\d+)\.conv\.", r"roi_heads.mask_head.\1.0."),
    (r"roi_head\.mask_head\.upsample\.", "roi_heads.mask_predictor.conv5_mask."),
]
_CLASS_ROWS = {  # mmdet layer -> (piip layer, rows per class, whether mmdet has a (last) background row)
    "roi_head.bbox_head.fc_cls": ("roi_heads.box_predictor.cls_score", 1, True),
    "roi_head.bbox_head.fc_reg": ("roi_heads.box_predictor.bbox_pred", 4, False),
    "roi_head.mask_head.conv_logits": ("roi_heads.mask_predictor.mask_fcn_logits", 1, False),
}


def convert_mask_rcnn(state: StateDict) -> tuple[StateDict, list[str]]:
    """mmdet keys (`neck.`, `rpn_head.`, `roi_head.`) -> `detector.*` keys, and the keys not placed.

    Keys of other parts (e.g. `backbone.`) are returned as not placed, for their own converter."""
    _check_class_counts(state)
    converted: StateDict = {}
    unplaced: list[str] = []
    for key, value in state.items():
        layer, _, suffix = key.rpartition(".")
        renamed = [re.sub(f"^{p}", r, key) for p, r in _RENAMES if re.match(f"^{p}(weight|bias)$", key)]
        if renamed:
            converted[PREFIX + renamed[0]] = value
        elif layer in _CLASS_ROWS and suffix in ("weight", "bias"):
            name, rows, has_background = _CLASS_ROWS[layer]
            converted[f"{PREFIX}{name}.{suffix}"] = background_first(value, rows, has_background)
        else:
            unplaced.append(key)
    return converted, unplaced


def background_first(value: torch.Tensor, rows: int, has_background: bool) -> torch.Tensor:
    """mmdet's rows -> torchvision's: a classifier's last (background) row moves to the front; a per-class
    layer (`rows` per class) gets zero background rows in front."""
    if has_background:
        return torch.cat([value[-1:], value[:-1]])
    return torch.cat([value.new_zeros(rows, *value.shape[1:]), value])


def background_last(value: torch.Tensor, rows: int, has_background: bool) -> torch.Tensor:
    """The inverse of `background_first` (torchvision's rows -> mmdet's), for checks and exports."""
    if has_background:
        return torch.cat([value[1:], value[:1]])
    return value[rows:]


def _check_class_counts(state: StateDict) -> None:
    """A class-agnostic or mismatched box or mask layer would load with another meaning: refuse it."""
    classes = state.get("roi_head.bbox_head.fc_cls.weight")
    if classes is None:
        return
    count = len(classes) - 1
    for layer, (_, rows, _) in _CLASS_ROWS.items():
        value = state.get(f"{layer}.weight")
        if value is not None and not layer.endswith("fc_cls") and len(value) != rows * count:
            raise CheckpointError(
                f"{layer}.weight: expected {rows * count} rows ({rows} per class for {count} classes, as "
                f"fc_cls has), got {len(value)}; class-agnostic heads are not supported"
            )
