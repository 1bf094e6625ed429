"""mmseg `UPerHead` + `FCNHead` names -> piip's segmentation task (`decode_head.*`, `aux_head.*`).

piip's heads (`piip.models.heads.upernet`) follow mmseg layer for layer; mmcv's `ConvModule` names its conv
`.conv` and its norm `.bn` where piip's `ConvBNReLU` is a Sequential (`.0`, `.1`), the pooling branch
(`psp_modules` + `bottleneck`) is piip's `ppm.stages` + `ppm.bottleneck`, `conv_seg` is `classifier.1`.
The released PIIP configs (`upernet_r50` base) use one aux conv and `concat_input=False`: a second aux conv
or a `conv_cat` has no place in piip's FCN head and is reported as not placed.
"""

from __future__ import annotations

import re

import torch

StateDict = dict[str, torch.Tensor]

_CONV_MODULE = r"\.(conv|bn)\.(.+)$"  # mmcv ConvModule with BN: conv (no bias) and norm
_RENAMES = [
    (r"^decode_head\.psp_modules\.(\d+)\.1" + _CONV_MODULE, r"decode_head.ppm.stages.\1.1.{}.\3"),
    (r"^decode_head\.bottleneck" + _CONV_MODULE, r"decode_head.ppm.bottleneck.{}.\2"),
    (r"^decode_head\.(lateral_convs|fpn_convs)\.(\d+)" + _CONV_MODULE, r"decode_head.\1.\2.{}.\4"),
    (r"^decode_head\.fpn_bottleneck" + _CONV_MODULE, r"decode_head.fpn_bottleneck.{}.\2"),
    (r"^auxiliary_head\.convs\.0" + _CONV_MODULE, r"aux_head.conv.{}.\2"),
]
_CLASSIFIERS = {"decode_head": "decode_head", "auxiliary_head": "aux_head"}


def convert_upernet(state: StateDict) -> tuple[StateDict, list[str]]:
    """mmseg `decode_head.` / `auxiliary_head.` keys -> piip's, and the keys not placed (also every key of
    another part, such as `backbone.`, for its own converter)."""
    converted: StateDict = {}
    unplaced: list[str] = []
    for key, value in state.items():
        target = _rename(key)
        if target is None:
            unplaced.append(key)
        else:
            converted[target] = value
    return converted, unplaced


def _rename(key: str) -> str | None:
    for pattern, replacement in _RENAMES:
        if match := re.match(pattern, key):
            kind = match.group(match.re.groups - 1)  # `conv` or `bn`
            return match.expand(replacement.format("0" if kind == "conv" else "1"))
    if match := re.match(r"^(decode_head|auxiliary_head)\.conv_seg\.(weight|bias)$", key):
        return f"{_CLASSIFIERS[match.group(1)]}.classifier.1.{match.group(2)}"
    return None
