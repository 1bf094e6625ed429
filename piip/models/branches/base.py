"""The interface every branch adapter implements, the family registry, and helpers adapters share.

A branch turns an image into a `BranchState` (a `(B, H, W, C)` token grid plus optional prefix/cls tokens)
with `embed`, then advances it through any contiguous range of its blocks with `forward_blocks`. Per-block
`dims` and `strides` describe what each block outputs (they change inside ConvNeXt stages).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.layers import RmsNormFp32
from torch import nn
from torch.utils.checkpoint import checkpoint

from piip.models.backbone.config import BranchSpec
from piip.models.branches.checkpoint import LoadReport, load_branch_checkpoint
from piip.models.registry import Registry

BRANCH_FAMILIES: Registry[Branch] = Registry("piip.models.branches", "family")  # filled by the adapters
UNUSED_BY_OFFICIAL = "<unused>."  # `from_official` marks official keys the official forward never reads


def unused_by_official(key: str, why: str) -> str:
    """The key `from_official` returns for an official tensor that the official model never reads."""
    return f"{UNUSED_BY_OFFICIAL}{key}|{why}"


@dataclass
class BranchState:
    """Tokens of one branch between blocks: a `(B, H, W, C)` grid and optional `(B, P, C)` prefix tokens."""

    x: torch.Tensor
    prefix: torch.Tensor | None = None

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.x.shape[1]), int(self.x.shape[2])


class Branch(nn.Module, ABC):
    """What the backbone needs from a pretrained model.

    A subclass that sets `family` registers itself under that name, which is also its module's name
    (`family: convnext` in a branch config -> `piip.models.branches.convnext`), so a new family is one
    adapter file and one branch config: nothing else lists families.
    """

    family: ClassVar[str]
    spec: BranchSpec
    dims: list[int]  # channels after each block
    strides: list[int]  # stride (in input pixels of this branch) after each block
    embed_stride: int
    has_cls_token: bool

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "family" in cls.__dict__:
            BRANCH_FAMILIES.register(cls.family, cls)

    @classmethod
    def input_multiple(cls, spec: BranchSpec) -> tuple[int, str]:
        """What this branch's input size must be a multiple of, and why (checked before building)."""
        return spec.patch_size, "patch size"

    def __init__(self, spec: BranchSpec) -> None:
        super().__init__()
        self.spec = spec
        self.grad_checkpointing = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dim(self) -> int:
        return self.dims[-1]

    @property
    def depth(self) -> int:
        return len(self.dims)

    @abstractmethod
    def embed(self, images: torch.Tensor) -> BranchState: ...

    @abstractmethod
    def forward_blocks(self, state: BranchState, start: int, end: int) -> BranchState:
        """Run blocks `start..end` (inclusive)."""

    @abstractmethod
    def block_index(self, param_name: str) -> int | None:
        """Block a parameter belongs to (-1 for the embedding, None for anything else); for lr decay."""

    def no_weight_decay(self) -> set[str]:
        return set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def load_pretrained(self, path: str | None = None) -> LoadReport:
        """Load the local checkpoint `path` (default: the spec's `pretrained`) into this branch."""
        return load_branch_checkpoint(self, path or self.spec.pretrained)

    @abstractmethod
    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Turn a checkpoint already in timm naming into this branch's layout (resampling as needed)."""

    def from_official(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Keys of the official PIIP code's module for this branch (relative to its `branchK.`) -> this
        branch's keys, at the checkpoint's own shapes (the converter checks them against the model).

        Keys the adapter cannot place are returned unchanged, so the converter can list them; tensors the
        official forward never reads come back under `unused_by_official(key, why)`.
        """
        raise NotImplementedError(f"branch family {self.family!r} has no official-checkpoint naming")

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and x.requires_grad:
            return checkpoint(block, x, use_reentrant=False)
        return block(x)


def drop_path_rates(spec: BranchSpec, depth: int) -> list[float]:
    if spec.drop_path_schedule == "linear":
        return [spec.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
    return [spec.drop_path_rate] * depth


def norm_layer(spec: BranchSpec) -> type[nn.Module]:
    if spec.norm == "rmsnorm":
        return partial(RmsNormFp32, eps=spec.norm_eps)  # fp32 statistics, as upstream
    return partial(nn.LayerNorm, eps=spec.norm_eps)  # exact nn.LayerNorm: the paper's FLOP rules count it


def token_grid(feature_map: torch.Tensor) -> torch.Tensor:
    """An NCHW map as the (B, H, W, C) token grid the blocks read, stored token-major.

    Elementwise results keep their inputs' layout, so a channel-major grid (a bare permute of a conv's
    output) would stay channel-major through every residual sum of every block, and each LayerNorm and
    linear would copy it (PIIP-TSB at 1568 on CPU: 1,000 copies per forward).
    """
    return feature_map.permute(0, 2, 3, 1).contiguous()


def resample_grid(pos: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, h, w, C) position embedding -> (1, H, W, C), bicubic in float32 as upstream does."""
    if tuple(pos.shape[1:3]) == tuple(size):
        return pos
    out = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=size, mode="bicubic", align_corners=False)
    return token_grid(out).to(pos.dtype)


def branch_class(spec: BranchSpec) -> type[Branch]:
    """The adapter registered for `spec.family`, importing its module on first use."""
    return BRANCH_FAMILIES.get(spec.family, f"branch {spec.name}")


def build_branch(spec: BranchSpec, **kwargs: Any) -> Branch:
    """Instantiate the adapter registered for `spec.family`."""
    return branch_class(spec)(spec, **kwargs)


def known_families() -> list[str]:
    return BRANCH_FAMILIES.names()
