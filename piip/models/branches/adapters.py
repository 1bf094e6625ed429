"""Branch adapters: one interface over timm ViTs (DeiT, DeiT III, AugReg, MAE, DINOv2, CLIP, InternViT-6B),
BEiT and ConvNeXt, so the backbone never checks which kind of model a branch is.

A branch turns an image into a `BranchState` (a `(B, H, W, C)` token grid plus optional prefix/cls tokens)
with `embed`, then advances it through any contiguous range of its blocks with `forward_blocks`. Per-block
`dims` and `strides` describe what each block outputs (they change inside ConvNeXt stages).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import partial

import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath, RmsNormFp32
from torch import nn
from torch.utils.checkpoint import checkpoint

from piip.errors import ConfigError
from piip.models.backbone.attention import GridAttention
from piip.models.backbone.config import BranchSpec, WindowConfig
from piip.models.branches.checkpoint import LoadReport, load_branch_checkpoint


@dataclass
class BranchState:
    """Tokens of one branch between blocks: a `(B, H, W, C)` grid and optional `(B, P, C)` prefix tokens."""

    x: torch.Tensor
    prefix: torch.Tensor | None = None

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.x.shape[1]), int(self.x.shape[2])


class Branch(nn.Module, ABC):
    """What the backbone needs from a pretrained model."""

    spec: BranchSpec
    dims: list[int]  # channels after each block
    strides: list[int]  # stride (in input pixels of this branch) after each block
    embed_stride: int
    has_cls_token: bool

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

    def _run(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and x.requires_grad:
            return checkpoint(block, x, use_reentrant=False)
        return block(x)


def _drop_path_rates(spec: BranchSpec, depth: int) -> list[float]:
    if spec.drop_path_schedule == "linear":
        return [spec.drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
    return [spec.drop_path_rate] * depth


def _norm_layer(spec: BranchSpec) -> type[nn.Module]:
    if spec.norm == "rmsnorm":
        return partial(RmsNormFp32, eps=spec.norm_eps)  # fp32 statistics, as upstream
    return partial(nn.LayerNorm, eps=spec.norm_eps)  # exact nn.LayerNorm: the paper's FLOP rules count it


def _resample_grid(pos: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(1, h, w, C) position embedding -> (1, H, W, C), bicubic in float32 as upstream does."""
    if tuple(pos.shape[1:3]) == tuple(size):
        return pos
    out = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=size, mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).to(pos.dtype)


class ViTBranch(Branch):
    """A timm `VisionTransformer` whose attention is replaced by `GridAttention` (windows, qk-norm over all
    heads for InternViT-6B). Parameter names are timm's, so timm-format checkpoints load directly."""

    timm_filter = staticmethod(timm.models.vision_transformer.checkpoint_filter_fn)

    def __init__(
        self,
        spec: BranchSpec,
        *,
        use_cls_token: bool = False,
        window: WindowConfig | None = None,
        img_size: int | None = None,
        attention_backend: str = "sdpa",
    ) -> None:
        super().__init__(spec)
        model = self._create_timm(spec, img_size or spec.pretrain_img_size)
        self._arch = [model]  # unregistered: the timm filter functions read shapes from it
        depth = len(model.blocks)
        windows = [window.window_for_block(i) if window else None for i in range(depth)]
        if use_cls_token and any(windows):
            raise ConfigError(f"branch {spec.name}: window attention cannot be combined with a cls token")
        self.patch_embed = model.patch_embed
        self.pos_embed = model.pos_embed
        self.num_pos_prefix = (
            0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        )
        self.has_cls_token = use_cls_token
        if use_cls_token and model.cls_token is None:
            raise ConfigError(
                f"branch {spec.name}: use_cls_token is set but {spec.timm_model} has no cls token"
            )
        self.cls_token = model.cls_token if use_cls_token else None
        self.norm_pre = getattr(model, "norm_pre", None) or nn.Identity()
        self.blocks = model.blocks
        for block, window, rate in zip(self.blocks, windows, _drop_path_rates(spec, depth), strict=True):
            self._adapt_block(block, window, rate, attention_backend)
        self.embed_dim = model.embed_dim
        self.dims = [model.embed_dim] * depth
        self.embed_stride = spec.patch_size
        self.strides = [spec.patch_size] * depth

    def _create_timm(self, spec: BranchSpec, img_size: int) -> nn.Module:
        kwargs = dict(
            img_size=img_size, patch_size=spec.patch_size, num_classes=0, norm_layer=_norm_layer(spec)
        )
        kwargs.update(spec.timm_kwargs)
        return timm.create_model(spec.timm_model, pretrained=False, **kwargs)

    def _adapt_block(self, block: nn.Module, window: int | None, drop_path: float, backend: str) -> None:
        block.attn = GridAttention.from_timm(
            block.attn,
            window_size=window,
            window_pad=self.spec.window_pad,
            backend=backend,
            qk_norm=self.spec.qk_norm,
            norm_layer=_norm_layer(self.spec),
        )
        block.attn.num_prefix_tokens = 1 if self.has_cls_token else 0
        block.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        block.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    @property
    def pos_embed_grid(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    def embed(self, images: torch.Tensor) -> BranchState:
        x = self.patch_embed.proj(images).permute(0, 2, 3, 1)
        x = self.patch_embed.norm(x)
        prefix = None
        if self.pos_embed is not None:
            grid_pos = self.pos_embed[:, self.num_pos_prefix :].reshape(1, *self.pos_embed_grid, -1)
            x = x + _resample_grid(grid_pos, x.shape[1:3]).to(x.dtype)
        if self.cls_token is not None:
            prefix = self.cls_token.expand(x.shape[0], -1, -1)
            if self.num_pos_prefix:
                prefix = prefix + self.pos_embed[:, :1].to(prefix.dtype)
            prefix = self.norm_pre(prefix)
        return BranchState(self.norm_pre(x), prefix)

    def forward_blocks(self, state: BranchState, start: int, end: int) -> BranchState:
        blocks = self.blocks[start : end + 1]
        if state.prefix is None:
            x = state.x
            for block in blocks:
                x = self._run(block, x)
            return BranchState(x)
        B, H, W, C = state.x.shape
        num_prefix = state.prefix.shape[1]
        seq = torch.cat([state.prefix, state.x.reshape(B, H * W, C)], dim=1)
        for block in blocks:
            seq = self._run(block, seq)
        return BranchState(seq[:, num_prefix:].reshape(B, H, W, C), seq[:, :num_prefix])

    def block_index(self, param_name: str) -> int | None:
        if param_name.startswith(("patch_embed.", "norm_pre.")) or param_name in ("pos_embed", "cls_token"):
            return -1
        match = re.match(r"blocks\.(\d+)\.", param_name)
        return int(match.group(1)) if match else None

    def no_weight_decay(self) -> set[str]:
        names = {"pos_embed", "cls_token"}
        names |= {
            n for n, _ in self.named_parameters() if n.endswith(("relative_position_bias_table", "gamma"))
        }
        return names

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state_dict = dict(state_dict)
        kernel = state_dict.get("patch_embed.proj.weight")
        target = self.patch_embed.proj.weight.shape[-2:]
        if kernel is not None and kernel.shape[-2:] != target:
            # 14x14 -> 16x16 patch kernels: plain bicubic resize without rescaling (PAPER.md §1.3)
            state_dict["patch_embed.proj.weight"] = F.interpolate(
                kernel.float(), size=tuple(target), mode="bicubic", align_corners=False
            ).to(kernel.dtype)
        if "pos_embed" in state_dict and self.pos_embed is not None:
            state_dict["pos_embed"] = self._adapt_pos_embed(state_dict["pos_embed"])
        return self.timm_filter(state_dict, self._arch[0])

    def _adapt_pos_embed(self, pos: torch.Tensor) -> torch.Tensor:
        """Checkpoint pos-embed (any grid, with or without cls slot) -> this branch's stored layout."""
        tokens = pos.shape[1]
        prefix = next((p for p in (0, 1, 2, 4, 5) if _is_square(tokens - p)), None)
        if prefix is None:
            raise ValueError(
                f"branch {self.name}: cannot read a square grid from pos_embed of {tokens} tokens"
            )
        side = int((tokens - prefix) ** 0.5)
        grid = _resample_grid(pos[:, prefix:].reshape(1, side, side, -1), self.pos_embed_grid).flatten(1, 2)
        if self.num_pos_prefix:
            slot = pos[:, :1] if prefix else torch.zeros_like(pos[:, :1])
            grid = torch.cat([slot, grid], dim=1)
        return grid


def _is_square(n: int) -> bool:
    return n > 0 and int(n**0.5) ** 2 == n


class BeitBranch(ViTBranch):
    """timm BEiT(v2): no absolute position embedding, per-block relative position bias resampled to each
    window (or to the whole grid for global blocks)."""

    timm_filter = staticmethod(timm.models.beit.checkpoint_filter_fn)

    def __init__(self, spec: BranchSpec, *, use_cls_token: bool = False, **kwargs) -> None:
        # Dense tasks only: relative position bias is defined on the patch grid, so the cls token is not used.
        super().__init__(spec, use_cls_token=False, **kwargs)


class ConvNeXtBranch(Branch):
    """A timm `ConvNeXt` as a flat list of blocks: stage blocks with each stage's downsampling layer as a
    block of its own (PAPER.md §5.2: 3+1+3+1+27+1+3 = 39 blocks for S/B/L, 21 for T)."""

    has_cls_token = False

    def __init__(self, spec: BranchSpec, **_: object) -> None:
        super().__init__(spec)
        kwargs = dict(num_classes=0, drop_path_rate=spec.drop_path_rate)
        kwargs.update(spec.timm_kwargs)
        model = timm.create_model(spec.timm_model, pretrained=False, **kwargs)
        self._arch = [model]
        self.stem, self.stages = model.stem, model.stages
        self.embed_stride = model.stem[0].stride[0]
        self.embed_dim = model.stem[0].out_channels
        blocks: list[nn.Module] = []
        self._block_of_prefix: dict[str, int] = {}
        self.dims, self.strides = [], []
        stride, dim = self.embed_stride, self.embed_dim
        for s, stage in enumerate(self.stages):
            if not isinstance(stage.downsample, nn.Identity):
                stride *= 2
                dim = _out_channels(stage.downsample, dim)
                self._block_of_prefix[f"stages.{s}.downsample."] = len(blocks)
                blocks.append(stage.downsample)
                self.dims.append(dim)
                self.strides.append(stride)
            for j, block in enumerate(stage.blocks):
                self._block_of_prefix[f"stages.{s}.blocks.{j}."] = len(blocks)
                blocks.append(block)
                self.dims.append(dim)
                self.strides.append(stride)
        self._blocks = blocks  # plain list: the modules are registered under `stages`

    @property
    def blocks(self) -> list[nn.Module]:
        return self._blocks

    def embed(self, images: torch.Tensor) -> BranchState:
        return BranchState(self.stem(images).permute(0, 2, 3, 1))

    def forward_blocks(self, state: BranchState, start: int, end: int) -> BranchState:
        x = state.x.permute(0, 3, 1, 2)
        for block in self._blocks[start : end + 1]:
            x = self._run(block, x)
        return BranchState(x.permute(0, 2, 3, 1))

    def block_index(self, param_name: str) -> int | None:
        if param_name.startswith("stem."):
            return -1
        for prefix, index in self._block_of_prefix.items():
            if param_name.startswith(prefix):
                return index
        return None

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.endswith("gamma")}

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return timm.models.convnext.checkpoint_filter_fn(state_dict, self._arch[0])


def _out_channels(module: nn.Module, default: int) -> int:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels if convs else default


BRANCH_FAMILIES: dict[str, type[Branch]] = {"vit": ViTBranch, "beit": BeitBranch, "convnext": ConvNeXtBranch}


def build_branch(spec: BranchSpec, **kwargs) -> Branch:
    """Instantiate the adapter registered for `spec.family`."""
    try:
        family = BRANCH_FAMILIES[spec.family]
    except KeyError:
        raise ConfigError(
            f"branch {spec.name}: unknown family {spec.family!r}; expected one of {sorted(BRANCH_FAMILIES)}"
        ) from None
    return family(spec, **kwargs)
