"""PIIP-LLaVA parts: the branch projector (PAPER.md §6.3), visual-token splicing and the language model.

The vision tower is a `PIIPBackbone` with `merge: none`: its per-branch final maps go to the projector,
which resizes every map to branch 0's grid (the highest resolution), maps each through its own
Linear -> GroupNorm(32) -> GELU -> Linear to the language model's width and sums them. One visual token per
cell of branch 0's final grid: 32x32 = 1024 tokens for 512/16 and 1024/32 inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from piip.errors import ConfigError
from piip.models.backbone.merge import ChannelsLastLinear, upsample

IGNORE_INDEX = -100  # label of every token that is not trained on (torch cross-entropy's ignore_index)
IMAGE_TOKEN_INDEX = -200  # input id of the image placeholder, replaced by the visual tokens


class BranchProjector(nn.Module):
    """Per-branch MLPs on NCHW maps, summed on branch 0's grid; generalises upstream's two-branch MLP."""

    def __init__(self, branch_dims: list[int], out_dim: int, groups: int = 32) -> None:
        super().__init__()
        if out_dim % groups:
            raise ConfigError(
                f"the language model's hidden size {out_dim} is not divisible by {groups} (GroupNorm groups "
                "of the projector)"
            )
        self.mlps = nn.ModuleList(
            nn.Sequential(
                ChannelsLastLinear(dim, out_dim),
                nn.GroupNorm(groups, out_dim),
                nn.GELU(),
                ChannelsLastLinear(out_dim, out_dim),
            )
            for dim in branch_dims
        )

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """(B, C_k, H_k, W_k) per branch -> (B, H_0 * W_0, out_dim) visual tokens."""
        size = tuple(maps[0].shape[-2:])
        total = None
        for x, mlp in zip(maps, self.mlps, strict=True):
            if tuple(x.shape[-2:]) != size:
                x = upsample(x, size)
            y = mlp(x)
            total = y if total is None else total + y
        return total.flatten(2).transpose(1, 2)


def splice_visual_tokens(
    embed_tokens: Callable[[torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    visual: torch.Tensor | None,
    labels: torch.Tensor | None = None,
    left_pad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Replace each row's `IMAGE_TOKEN_INDEX` by that row's visual tokens.

    `visual` holds one (T, D) block per row that has a placeholder, in row order. Rows are re-padded after
    splicing (right for training, left for generation); labels of visual tokens and padding are
    IGNORE_INDEX. Returns inputs_embeds, attention_mask and labels.
    """
    placeholders = (input_ids == IMAGE_TOKEN_INDEX).sum(dim=1)
    if (placeholders > 1).any():
        raise ValueError(f"rows {torch.nonzero(placeholders > 1).flatten().tolist()} hold several images")
    num_images = int(placeholders.sum())
    if num_images != (0 if visual is None else len(visual)):
        raise ValueError(
            f"{num_images} rows have an image placeholder but {0 if visual is None else len(visual)} "
            "images were given"
        )
    text = embed_tokens(input_ids.clamp(min=0))  # placeholder ids embed as token 0, then get replaced
    rows, row_labels = [], []
    next_image = 0
    for b in range(len(input_ids)):
        keep = attention_mask[b].bool()
        ids, emb = input_ids[b][keep], text[b][keep]
        lab = labels[b][keep] if labels is not None else None
        if placeholders[b]:
            p = int(torch.nonzero(ids == IMAGE_TOKEN_INDEX)[0, 0])
            tokens = visual[next_image].to(emb.dtype)
            next_image += 1
            emb = torch.cat([emb[:p], tokens, emb[p + 1 :]])
            if lab is not None:
                ignored = lab.new_full((len(tokens),), IGNORE_INDEX)
                lab = torch.cat([lab[:p], ignored, lab[p + 1 :]])
        rows.append(emb)
        row_labels.append(lab)
    side = "left" if left_pad else "right"
    embeds = pad_sequence(rows, batch_first=True, padding_side=side)
    mask = pad_sequence(
        [torch.ones(len(r), dtype=torch.bool, device=r.device) for r in rows],
        batch_first=True,
        padding_side=side,
    )
    out_labels = None
    if labels is not None:
        out_labels = pad_sequence(row_labels, batch_first=True, padding_value=IGNORE_INDEX, padding_side=side)
    return embeds, mask, out_labels


def load_language_model(path: str | Path, pretrained: bool, dtype: str | None = None) -> nn.Module:
    """A causal LM from a local Hugging Face folder: with its weights, or (`pretrained=False`, when a
    checkpoint will supply them) only its architecture, which skips reading billions of parameters twice."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"task.module.language_model.path: {path} is not a local Hugging Face model folder (no "
            "config.json); download the model there first (e.g. lmsys/vicuna-7b-v1.5): nothing is "
            "fetched at run time"
        )
    torch_dtype = getattr(torch, dtype) if dtype else None
    if pretrained:
        return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch_dtype)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    return AutoModelForCausalLM.from_config(config, dtype=torch_dtype)


def language_model_width(model: Any) -> int:
    return int(model.get_input_embeddings().embedding_dim)
