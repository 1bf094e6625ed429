"""Loading pretrained branch weights from local files or folders (nothing is ever downloaded).

Steps: read the file with `weights_only=True` (or a Hugging Face `save_pretrained` folder, sharded or not),
unwrap `model`/`state_dict`/`module`, convert the file's naming to timm's (`CHECKPOINT_FORMATS`), let the
branch resample position embeddings / patch kernels and apply timm's own filter, then load non-strictly and
report what was missing or unexpected.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from piip.models.branches import Branch

log = logging.getLogger("piip")
StateDict = dict[str, torch.Tensor]


@dataclass
class LoadReport:
    """Which keys of the branch stayed at their initial values, and which checkpoint keys were unused."""

    path: str
    missing: list[str] = field(default_factory=list)
    unused: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # checkpoint tensors not loaded

    @property
    def unexpected(self) -> list[str]:
        return sorted(self.unused)


def _internvl_to_timm(state_dict: StateDict) -> StateDict:
    """InternVL / Hugging Face InternViT-6B names -> timm ViT names (files already in timm naming pass)."""
    rules = [
        (r"^embeddings\.class_embedding$", "cls_token"),
        (r"^embeddings\.position_embedding$", "pos_embed"),
        (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
        (r"^encoder\.layers\.(\d+)\.ls([12])$", r"blocks.\1.ls\2.gamma"),
        (r"^encoder\.layers\.(\d+)\.", r"blocks.\1."),
    ]
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


# Hugging Face CLIP keys (after dropping a `vision_model.` prefix) that a vision branch never uses.
_HF_CLIP_DROPPED = ("text_model.", "logit_scale", "visual_projection.", "text_projection.")
_HF_CLIP_QKV = re.compile(r"^encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
_HF_CLIP_RENAMES = [
    (r"^embeddings\.patch_embedding\.", "patch_embed.proj."),
    (r"^pre_layrnorm\.", "norm_pre."),  # sic: Hugging Face's spelling
    (r"^post_layernorm\.", "norm."),
    (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layers\.(\d+)\.layer_norm([12])\.", r"blocks.\1.norm\2."),
    (r"^encoder\.layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
]


def hf_clip_to_timm(state_dict: StateDict) -> StateDict:
    """Hugging Face `CLIPVisionModel` / `CLIPModel` weights -> timm `VisionTransformer` names and shapes.

    Why: PIIP-LLaVA's CLIP branches start from the Hugging Face checkpoints LLaVA uses (openai/clip-vit-*,
    OpenGVLab/clip-vit-large-patch14to16-*), while the branch is a timm ViT (pre-norm, quick-GELU). The two
    hold the same weights under different names and layouts:

    - `embeddings.class_embedding` (D,) -> `cls_token` (1, 1, D); `embeddings.position_embedding.weight`
      (N+1, D), an `nn.Embedding` table with the cls slot first -> `pos_embed` (1, N+1, D);
      `embeddings.position_ids` (a buffer) is dropped;
    - separate `self_attn.{q,k,v}_proj` linears -> one fused `attn.qkv` whose rows are q, then k, then v
      (Hugging Face scales q after its projection, timm inside attention: the same computation);
    - `pre_layrnorm` -> `norm_pre`, `layer_norm1/2` -> `norm1/2`, `out_proj` -> `attn.proj`,
      `post_layernorm` -> `norm` (the branch has no final norm, so the load report lists it as unused).

    A full `CLIPModel` stores the vision tower under `vision_model.` next to the text tower and projection
    heads; only the vision part is kept. Keys in neither naming pass through unchanged (and are then
    reported as unused).
    """
    out: StateDict = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("vision_model.")
        if key.startswith(_HF_CLIP_DROPPED) or key == "embeddings.position_ids":
            continue
        if key == "embeddings.class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "embeddings.position_embedding.weight":
            out["pos_embed"] = value.unsqueeze(0)
        elif match := _HF_CLIP_QKV.match(key):
            layer, part, kind = match.groups()
            qkv.setdefault(f"blocks.{layer}.attn.qkv.{kind}", {})[part] = value
        else:
            for pattern, replacement in _HF_CLIP_RENAMES:
                key = re.sub(pattern, replacement, key)
            out[key] = value
    for name, parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"{name}: needs the q, k and v projections, the checkpoint has {sorted(parts)}")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


_UNIPERCEIVER_RENAMES = [
    (r"^visual_embed\.patch_embed\.proj\.", "patch_embed.proj."),
    (r"^visual_embed\.patch_embed\.temporal_pos_embed\.weight$", "temporal_pos_embed"),
    (r"^visual_embed\.embeddings_norm\.", "norm_pre."),
    (r"^layers\.(\d+)\.self_attn\.in_proj\.", r"blocks.\1.attn.qkv."),
    (r"^layers\.(\d+)\.self_attn\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"^layers\.(\d+)\.linear([12])\.", r"blocks.\1.mlp.fc\2."),
    (r"^layers\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"^layers\.(\d+)\.gamma_([12])$", r"blocks.\1.ls\2.gamma"),
]


def uniperceiver_to_timm(state_dict: StateDict) -> StateDict:
    """Uni-Perceiver (upstream `UnifiedBertEncoder`, whose names the `*_converted.pth` release files use)
    -> timm `VisionTransformer` names, as the Uni-Perceiver branch holds them.

    `spatial_pos_embed` (an `nn.Embedding` over the 14x14 grid, no cls slot) becomes `pos_embed` (1, N, D);
    the branch keeps `temporal_pos_embed` (8 frames) beside it, as upstream adds frame 0 to every token.
    A leading `module.` is dropped, as mmcv's loader does. Keys in neither naming pass unchanged.
    """
    out: StateDict = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key == "visual_embed.patch_embed.spatial_pos_embed.weight":
            out["pos_embed"] = value.unsqueeze(0)
            continue
        for pattern, replacement in _UNIPERCEIVER_RENAMES:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


CHECKPOINT_FORMATS: dict[str, Callable[[StateDict], StateDict]] = {
    "timm": lambda state_dict: state_dict,
    "internvl": _internvl_to_timm,
    "hf_clip": hf_clip_to_timm,
    "uniperceiver": uniperceiver_to_timm,
}

# What a Hugging Face `save_pretrained` / `huggingface-cli download` folder holds, in the order looked for.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def read_state_dict(path: str | Path) -> StateDict:
    """Tensors of a `.pth`/`.pt`/`.bin` or `.safetensors` file, unwrapped from common containers, or of a
    Hugging Face model folder (`HF_WEIGHT_FILES`, else the shards listed by one of `HF_INDEX_FILES`)."""
    path = Path(path)
    if path.is_dir():
        return _read_hf_folder(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    torch.serialization.add_safe_globals([argparse.Namespace])  # DeiT files store their training args
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the path and what to do
        raise ValueError(f"{path}: not a readable weights-only PyTorch checkpoint ({err})") from err
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a dict of tensors (optionally under 'model' or 'state_dict')")
    return obj


def _read_hf_folder(folder: Path) -> StateDict:
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return read_state_dict(folder / name)
    for name in HF_INDEX_FILES:
        if (folder / name).is_file():
            return _read_shards(folder / name)
    raise ValueError(
        f"{folder}: no weights in this folder; expected one of {', '.join(HF_WEIGHT_FILES + HF_INDEX_FILES)} "
        f"(as written by `save_pretrained` or `huggingface-cli download <repo> --local-dir {folder}`)"
    )


def _read_shards(index: Path) -> StateDict:
    """All shards named by a Hugging Face `*.index.json` (its `weight_map`: tensor name -> shard file)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{index}: not a Hugging Face shard index with a 'weight_map' ({err!r})") from err
    missing = [shard for shard in shards if not (index.parent / shard).is_file()]
    if missing:
        raise FileNotFoundError(f"{index}: shard file(s) {missing} not found (incomplete download?)")
    state_dict: StateDict = {}
    for shard in shards:
        state_dict.update(read_state_dict(index.parent / shard))
    return state_dict


def load_branch_checkpoint(branch: Branch, path: str | Path | None) -> LoadReport:
    """Load `path` into `branch`; shape mismatches are errors, missing/unexpected keys are logged."""
    if path is None:
        raise ValueError(
            f"branch {branch.name}: no pretrained checkpoint configured (branch.pretrained is null)"
        )
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"branch {branch.name}: pretrained checkpoint not found at {path}. Download "
            f"{branch.spec.checkpoint_source or 'the file'} there (paths.pretrained_dir), or set the "
            f"branch's `pretrained: null` to start from random weights."
        )
    fmt = branch.spec.checkpoint_format
    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(
            f"branch {branch.name}: unknown checkpoint_format {fmt!r}; expected {sorted(CHECKPOINT_FORMATS)}"
        )
    try:
        converted = CHECKPOINT_FORMATS[fmt](read_state_dict(path))
    except ValueError as err:
        raise ValueError(f"branch {branch.name}: {err}") from err
    state_dict = branch.adapt_state_dict(converted)
    own = branch.state_dict()
    loadable = {k: v for k, v in state_dict.items() if k in own}
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in loadable.items()
        if v.shape != own[k].shape
    ]
    if mismatched:
        raise ValueError(
            f"branch {branch.name}: {path} does not match the architecture:\n  " + "\n  ".join(mismatched)
        )
    result = branch.load_state_dict(loadable, strict=False)
    unused = {k: v for k, v in state_dict.items() if k not in own}
    report = LoadReport(str(path), sorted(result.missing_keys), unused)
    log.info("branch %s: loaded %s (%d tensors)", branch.name, path, len(loadable))
    if report.missing:
        log.warning(
            "branch %s: %d keys not in checkpoint: %s", branch.name, len(report.missing), report.missing
        )
    if report.unexpected:
        log.info(
            "branch %s: %d checkpoint keys unused: %s", branch.name, len(report.unexpected), report.unexpected
        )
    return report
