"""The official PIIP-LLaVA checkpoint's projector and language-model names -> piip's (PAPER.md §6.3-6.4).

A released PIIP-LLaVA folder is LLaVA's `LlavaLlamaForCausalLM`: the vision tower under
`model.vision_tower.vision_tower.` (renamed by `piip.models.convert.official`), the projector under
`model.mm_projector.`, and Vicuna under its own `LlamaForCausalLM` names (`model.embed_tokens`,
`model.layers`, `model.norm`, `lm_head`), which piip's language model keeps under `language_model.`.

Upstream's `TwoBranchMLP` holds one `nn.Sequential` per branch, numbered from the largest model (`branch1`,
low resolution); its parameters sit at positions 1 (Linear), 3 (GroupNorm) and 6 (Linear) between the
permutes. piip's `BranchProjector` numbers branches from the highest resolution (`mlps.0`) and holds
Linear, GroupNorm, GELU, Linear at 0-3.

transformers < 4.49 renames any `gamma` in a checkpoint key to `weight` when loading, so upstream's LLaVA code
names its injector layer scales `ca_weight` / `cffn_weight` (the detection code: `ca_gamma` / `cffn_gamma`)
and trains ConvNeXt with its layer scale renamed `weight` (handled by the ConvNeXt branch's `from_official`).
"""

from __future__ import annotations

import re

import torch

from piip.models.branches.base import unused_by_official

StateDict = dict[str, torch.Tensor]

TOWER = "model.vision_tower.vision_tower."
PROJECTOR = "model.mm_projector."
_LANGUAGE_MODEL = ("model.", "lm_head.")
# LLaVA's own modules under `model.` (the tower; `image_newline` of anyres 'unpad' merging, which piip lacks)
_LLAVA_ONLY = (TOWER, "model.image_newline")
# `norm='gn'` (every released config): Permute, Linear, Permute, GroupNorm, GELU, Permute, Linear, Permute
_PROJECTOR_INDEX = {"1": "0", "3": "1", "6": "3"}
_PROJECTOR_KEY = re.compile(r"^branch(\d+)\.(\d+)\.(weight|bias)$")
_INJECTOR_SCALE = re.compile(r"^(interactions\.\d+\.interaction_units_\d+\.\w+_injector)\.(ca|cffn)_weight$")
_ROTARY = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def tower_state(state: StateDict) -> StateDict:
    """The vision tower's official keys in the naming `convert_backbone` reads: LLaVA's injector layer
    scales `ca_weight` / `cffn_weight` are the detection code's `ca_gamma` / `cffn_gamma`."""
    return {_INJECTOR_SCALE.sub(r"\1.\2_gamma", k): v for k, v in state.items()}


def convert_projector(state: StateDict, num_branches: int) -> tuple[StateDict, list[str]]:
    """`TwoBranchMLP` keys (without `model.mm_projector.`) -> `BranchProjector` keys, and the keys not placed
    (e.g. `norm='ln'`, whose norm has no parameters and whose Linear sits elsewhere)."""
    placed: StateDict = {}
    unplaced: list[str] = []
    for key, value in state.items():
        match = _PROJECTOR_KEY.match(key)
        index = _PROJECTOR_INDEX.get(match.group(2)) if match else None
        branch = num_branches - int(match.group(1)) if match else -1
        if index is None or not 0 <= branch < num_branches:
            unplaced.append(key)
            continue
        placed[f"mlps.{branch}.{index}.{match.group(3)}"] = value
    return placed, unplaced


def convert_llava_heads(state: StateDict, num_branches: int) -> tuple[StateDict, list[str]]:
    """Everything of a LLaVA checkpoint but its vision tower -> `projector.*` / `language_model.*` keys of
    piip's multimodal task, and the official keys not placed (with their full official names).

    Rotary `inv_freq` buffers (saved by transformers before 4.31) are recomputed from the config: they come
    back marked `unused_by_official`, for the converter to report."""
    placed: StateDict = {}
    unplaced: list[str] = []
    projector = {k.removeprefix(PROJECTOR): v for k, v in state.items() if k.startswith(PROJECTOR)}
    renamed, missed = convert_projector(projector, num_branches)
    placed.update({f"projector.{k}": v for k, v in renamed.items()})
    unplaced += [PROJECTOR + k for k in missed]
    for key, value in state.items():
        if key.startswith(PROJECTOR):
            continue
        if _ROTARY.match(key):
            why = "a rotary-embedding buffer the model derives from its config"
            placed[unused_by_official(key, why)] = value
        elif key.startswith(_LANGUAGE_MODEL) and not key.startswith(_LLAVA_ONLY):
            placed[f"language_model.{key}"] = value
        else:
            unplaced.append(key)
    return placed, unplaced
