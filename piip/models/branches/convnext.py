"""ConvNeXt branches (timm `ConvNeXt`), flattened to one list of blocks."""

from __future__ import annotations

import re

import timm
import torch
from torch import nn

from piip.errors import ConfigError
from piip.models.backbone.config import BranchSpec
from piip.models.branches.base import Branch, BranchState, unused_by_official

# Hugging Face ConvNeXt names -> timm's (same tensors: HF's pointwise convs are Linear layers, as timm's MLP)
_HF_CONVNEXT = [
    (r"^embeddings\.patch_embeddings\.", "stem.0."),
    (r"^embeddings\.layernorm\.", "stem.1."),
    (r"^encoder\.stages\.(\d+)\.downsampling_layer\.", r"stages.\1.downsample."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.dwconv\.", r"stages.\1.blocks.\2.conv_dw."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layernorm\.", r"stages.\1.blocks.\2.norm."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.pwconv([12])\.", r"stages.\1.blocks.\2.mlp.fc\3."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.layer_scale_parameter$", r"stages.\1.blocks.\2.gamma"),
]

# timm ConvNeXt names under upstream's `ConvNextTimmWrapper`, and its renamed layer scale
_TIMM_NAMES = ("stem.", "stages.", "norm_pre.", "head.")
_TIMM_LAYER_SCALE = re.compile(r"^(stages\.\d+\.blocks\.\d+)\.weight$")


class ConvNeXtBranch(Branch):
    """A timm `ConvNeXt` as a flat list of blocks: stage blocks with each stage's downsampling layer as a
    block of its own (PAPER.md §5.2: 3+1+3+1+27+1+3 = 39 blocks for S/B/L, 21 for T)."""

    family = "convnext"
    has_cls_token = False

    @classmethod
    def input_multiple(cls, spec: BranchSpec) -> tuple[int, str]:
        return 32, "total stride"

    def __init__(self, spec: BranchSpec, **_: object) -> None:
        if spec.mlp_activation != "gelu":
            raise ConfigError(
                f"branch {spec.name}: mlp_activation={spec.mlp_activation!r} is a ViT setting; ConvNeXt "
                "branches keep timm's exact GELU"
            )
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

    def from_official(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Upstream's `ConvNextHFWrapper` (detection: a Hugging Face `ConvNextModel`) or `ConvNextTimmWrapper`
        (PIIP-LLaVA: a timm `ConvNeXt`), both under `convnext_model.`."""
        out: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            name = key.removeprefix("convnext_model.")
            if name != key and name.startswith(_TIMM_NAMES):
                out.update(_from_official_timm(key, name, value))
                continue
            if name.startswith("layernorm."):  # the pooled-output norm
                why = "Hugging Face's pooled-output norm; upstream PIIP reads the stage maps"
                out[unused_by_official(key, why)] = value
                continue
            renamed = name
            for pattern, replacement in _HF_CONVNEXT:
                renamed = re.sub(pattern, replacement, renamed)
            out[renamed if renamed != name and key != name else key] = value  # unknown: its own name
        return out

    def adapt_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return timm.models.convnext.checkpoint_filter_fn(state_dict, self._arch[0])


def _from_official_timm(key: str, name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """One tensor of upstream's timm ConvNeXt. Upstream trains and evaluates with `replace_timm_convnext()`,
    which renames each block's layer scale `gamma` to `weight` (`blocks.j.weight`); plain timm names pass."""
    if name.startswith("head."):
        why = "timm's classifier head (final norm, pre-logits MLP); upstream PIIP reads the stage maps"
        return {unused_by_official(key, why): value}
    return {_TIMM_LAYER_SCALE.sub(r"\1.gamma", name): value}


def _out_channels(module: nn.Module, default: int) -> int:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels if convs else default
