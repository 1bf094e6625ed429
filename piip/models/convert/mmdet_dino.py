"""mmdet 2.x DINO head names (`neck.`, `bbox_head.`) -> piip's DINO detector (`detector.*`).

The modules match layer for layer; only names differ. mmcv builds each transformer layer from lists
(`attentions.{i}`, `ffns.0.layers`, `norms.{i}`) where piip names them by role, as torch's own transformer
layers do (`self_attn`, `cross_attn`, `linear1/2`, `norm1..3`); mmcv's `ConvModule` (`conv`, `gn`) is a
`Sequential` here; mmdet's `cls_branches`/`reg_branches` are `class_heads`/`box_heads` (torchvision `MLP`s,
whose linear layers sit at 0, 3, 6). Classes are sigmoid outputs without background, in the same order.
"""

from __future__ import annotations

import re

import torch

StateDict = dict[str, torch.Tensor]
PREFIX = "detector."
_T = r"bbox_head\.transformer\."

_RENAMES = [  # (mmdet, piip) patterns up to the parameter name, which is carried over
    (r"neck\.convs\.(\d+)\.conv\.", r"neck.inputs.\1.0."),
    (r"neck\.convs\.(\d+)\.gn\.", r"neck.inputs.\1.1."),
    (r"neck\.extra_convs\.(\d+)\.conv\.", r"neck.extra.\1.0."),
    (r"neck\.extra_convs\.(\d+)\.gn\.", r"neck.extra.\1.1."),
    (_T + r"encoder\.layers\.(\d+)\.attentions\.0\.", r"encoder.layers.\1.self_attn."),
    (_T + r"decoder\.layers\.(\d+)\.attentions\.0\.attn\.", r"decoder.layers.\1.self_attn."),
    (_T + r"decoder\.layers\.(\d+)\.attentions\.1\.", r"decoder.layers.\1.cross_attn."),
    (_T + r"(en|de)coder\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\.", r"\1coder.layers.\2.linear1."),
    (_T + r"(en|de)coder\.layers\.(\d+)\.ffns\.0\.layers\.1\.", r"\1coder.layers.\2.linear2."),
    (_T + r"(en|de)coder\.layers\.(\d+)\.norms\.0\.", r"\1coder.layers.\2.norm1."),
    (_T + r"(en|de)coder\.layers\.(\d+)\.norms\.1\.", r"\1coder.layers.\2.norm2."),
    (_T + r"decoder\.layers\.(\d+)\.norms\.2\.", r"decoder.layers.\1.norm3."),
    (_T + r"decoder\.ref_point_head\.0\.", "decoder.ref_point_head.0."),
    (_T + r"decoder\.ref_point_head\.2\.", "decoder.ref_point_head.3."),
    (_T + r"decoder\.norm\.", "decoder.norm."),
    (_T + r"enc_output\.", "enc_output."),
    (_T + r"enc_output_norm\.", "enc_output_norm."),
    (_T + r"query_embed\.", "query_embed."),
    (r"bbox_head\.label_embedding\.", "label_embedding."),
    (r"bbox_head\.cls_branches\.(\d+)\.", r"class_heads.\1."),
    (r"bbox_head\.reg_branches\.(\d+)\.0\.", r"box_heads.\1.0."),
    (r"bbox_head\.reg_branches\.(\d+)\.2\.", r"box_heads.\1.3."),
    (r"bbox_head\.reg_branches\.(\d+)\.4\.", r"box_heads.\1.6."),
]
_PARAMETER = r"([a-z_]+\.)*[a-z_]*(weight|bias)"  # the rest: the module inside the layer and the parameter
_WHOLE = {_T + "level_embeds": "level_embeds"}  # bare parameters


def convert_dino(state: StateDict) -> tuple[StateDict, list[str]]:
    """mmdet keys -> `detector.*` keys, and the keys not placed (e.g. `backbone.`, for its own converter)."""
    converted: StateDict = {}
    unplaced: list[str] = []
    for key, value in state.items():
        whole = [piip for mmdet, piip in _WHOLE.items() if re.fullmatch(mmdet, key)]
        renamed = whole or [
            re.sub(f"^{pattern}", replacement, key)
            for pattern, replacement in _RENAMES
            if re.fullmatch(f"{pattern}{_PARAMETER}", key)
        ]
        if renamed:
            converted[PREFIX + renamed[0]] = value
        else:
            unplaced.append(key)
    return converted, unplaced
