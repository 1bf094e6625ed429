"""`PIIPBackbone`: one implementation for any number of branches (one branch = the single-branch baseline).

Branch order: index 0 = highest resolution / smallest model, last = lowest resolution / largest model.
Data flow (DESIGN.md): resize the image per branch -> embed -> for each interaction stage run every
branch's blocks, then the interaction units from the high-resolution end down -> merge -> heads.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

from piip.errors import ConfigError
from piip.models.backbone.config import PIIPConfig, check_interaction_indexes, split_evenly
from piip.models.backbone.deformable import DeformableAttention, set_deformable_backend
from piip.models.backbone.interaction import BidirectionalInteraction
from piip.models.backbone.merge import BranchMerge
from piip.models.backbone.taps import PyramidTaps
from piip.models.branches import Branch, BranchState, branch_class, build_branch
from piip.models.branches.checkpoint import LoadReport
from piip.models.checks import whole_number
from piip.models.heads import BranchClassifier, MergedClassifier


@dataclass
class PIIPOutput:
    """Everything a task head may use. Maps are NCHW."""

    branch_maps: list[torch.Tensor]  # final map of every branch (branch order)
    cls_tokens: list[torch.Tensor | None]  # (B, 1, C_k) per branch, None without cls token
    features: torch.Tensor | None = None  # merged map on branch 0's grid, C = largest branch's width
    pyramid: list[torch.Tensor] | None = None  # strides 4, 8, 16, 32 (dense tasks)
    logits: torch.Tensor | None = None  # classification head


class PIIPBackbone(nn.Module):
    def __init__(self, config: PIIPConfig) -> None:
        super().__init__()
        self.config = config
        _check_branch_settings(config)
        self.branches = nn.ModuleList(self._build_branch(config, k) for k in range(config.num_branches))
        self.stage_ranges = self._stage_ranges(config)
        self.num_interactions = len(self.stage_ranges[0])
        _check_out_interaction_indexes(config.out_interaction_indexes, self.num_interactions)
        _check_widths(config, self)
        stage_dims = [
            [b.dims[end] for _, end in ranges]
            for b, ranges in zip(self.branches, self.stage_ranges, strict=True)
        ]
        self.interactions = nn.ModuleList(
            nn.ModuleList(
                BidirectionalInteraction(stage_dims[k][i], stage_dims[k + 1][i], config.interaction)
                for k in range(config.num_branches - 1)
            )
            for i in range(self.num_interactions)
        )
        final_dims = [b.dim for b in self.branches]
        self.merge = BranchMerge(config.merge, final_dims) if self._merges else None
        self.intermediate_merges = nn.ModuleList(
            BranchMerge(config.merge, [dims[i] for dims in stage_dims])
            for i in (config.out_interaction_indexes if self._merges else [])
        )
        self.pyramid = self._build_pyramid(config, stage_dims) if config.head == "pyramid" else None
        self.classifier = (
            self._build_classifier(config, final_dims) if config.head == "classification" else None
        )
        if isinstance(self.classifier, BranchClassifier) and config.classifier_token == "cls":
            missing = [b.name for b in self.branches if not b.has_cls_token]
            if missing:
                raise ConfigError(
                    f"model.classifier_token=cls (model.classifier=per_branch): branches {missing} have no "
                    f"cls token; set use_cls_token=true (ConvNeXt and BEiT branches never have one)"
                )
        self.grad_checkpointing = False
        self.init_new_weights()
        set_deformable_backend(self, config.deformable_backend)

    # -- construction -------------------------------------------------------------------------------------
    @staticmethod
    def _build_branch(config: PIIPConfig, k: int) -> Branch:
        return build_branch(
            config.branches[k],
            use_cls_token=config.use_cls_token,
            window=config.window,
            img_size=config.resolutions[k] if config.pos_embed_at_resolution else None,
            attention_backend=config.attention_backend,
        )

    def _stage_ranges(self, config: PIIPConfig) -> list[list[tuple[int, int]]]:
        ranges = []
        for k, branch in enumerate(self.branches):
            where = f"model.branches[{k}] ({branch.name}).interaction_indexes"
            indexes = branch.spec.interaction_indexes
            if indexes is None:
                indexes = split_evenly(branch.depth, config.num_interactions)
            check_interaction_indexes(indexes, branch.depth, where)
            ranges.append([tuple(pair) for pair in indexes])
        counts = {len(r) for r in ranges}
        if len(counts) > 1:
            detail = ", ".join(f"{b.name}: {len(r)}" for b, r in zip(self.branches, ranges, strict=True))
            raise ConfigError(
                f"model interaction_indexes: every branch needs the same number of stages ({detail})"
            )
        return ranges

    @property
    def _merges(self) -> bool:
        return self.config.merge != "none" and self.config.num_branches > 1

    @property
    def out_channels(self) -> int:
        return self.branches[-1].dim

    def _build_pyramid(self, config: PIIPConfig, stage_dims: list[list[int]]) -> PyramidTaps:
        branch0 = self.branches[0]
        if config.merge == "regular_fpn":
            ends = [self.stage_ranges[0][i][1] for i in config.out_interaction_indexes]
            strides = [branch0.strides[e] for e in ends] + [branch0.strides[-1]]
            channels = [stage_dims[-1][i] for i in config.out_interaction_indexes] + [self.out_channels]
        else:
            strides = [branch0.strides[-1]] * 4
            channels = [self.out_channels] * 4
        try:
            return PyramidTaps(strides, channels, config.pyramid_norm, config.pyramid_strides)
        except ValueError as err:
            raise ConfigError(
                f"model.head=pyramid (model.pyramid_strides={config.pyramid_strides}): branch {branch0.name} "
                f"outputs strides {strides}: {err}"
            ) from err

    @staticmethod
    def _build_classifier(config: PIIPConfig, dims: list[int]) -> nn.Module:
        if config.classifier == "per_branch":
            return BranchClassifier(dims, config.num_classes, config.classifier_token)
        return MergedClassifier(dims[-1], config.num_classes)

    @torch.no_grad()
    def init_new_weights(self) -> None:
        """Initialise everything that is not a pretrained branch (PAPER.md §2.6); gammas stay zero."""
        for part in (self.interactions, self.merge, self.intermediate_merges, self.pyramid, self.classifier):
            if part is None:
                continue
            for module in part.modules():
                if isinstance(module, nn.Linear):
                    trunc_normal_(module.weight, std=0.02)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)
                elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                    fan_out = (
                        module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
                    )
                    module.weight.normal_(0, (2.0 / fan_out) ** 0.5)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
            for module in part.modules():
                if isinstance(module, DeformableAttention):
                    module.reset_parameters()

    def load_pretrained(self) -> dict[str, LoadReport]:
        """Load every branch whose spec names a pretrained file.

        Per-branch classifiers start from each checkpoint's own final norm and head where their shapes fit
        (as upstream's classification models do).
        """
        reports = {}
        for k, branch in enumerate(self.branches):
            if not branch.spec.pretrained:
                continue
            reports[branch.name] = report = branch.load_pretrained()
            if isinstance(self.classifier, BranchClassifier):
                self.classifier.load_branch_head(k, report.unused)
        return reports

    # -- forward ------------------------------------------------------------------------------------------
    def branch_scales(self) -> list[float]:
        """Scale factor of each branch's input, resolution_k / resolution_0.

        Upstream resizes by this factor, not to a target size, and so does piip: PyTorch samples output
        pixel i at `(i + 0.5) / s - 0.5` with a scale factor but at `(i + 0.5) * in / out - 0.5` with a size,
        which differ whenever `H * s` is fractional (most padded COCO inputs), and released weights expect
        upstream's pyramid.
        """
        top = self.config.resolutions[0]
        return [r / top for r in self.config.resolutions]

    def branch_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Input size of each branch, as `F.interpolate` computes it for the scale factor (floored)."""
        return [(math.floor(float(height) * s), math.floor(float(width) * s)) for s in self.branch_scales()]

    def forward(self, images: torch.Tensor) -> PIIPOutput:
        """`images`: (B, 3, H, W) at the highest branch resolution."""
        states = []
        for branch, scale in zip(self.branches, self.branch_scales(), strict=True):
            x = (
                images
                if scale >= 1
                else F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
            )
            states.append(branch.embed(x))
        intermediates = []
        for i in range(self.num_interactions):
            states = [
                b.forward_blocks(s, *r[i])
                for b, s, r in zip(self.branches, states, self.stage_ranges, strict=True)
            ]
            for k, unit in enumerate(self.interactions[i]):
                states[k], states[k + 1] = self._interact(unit, states[k], states[k + 1])
            if i in self.config.out_interaction_indexes:
                maps = [s.x.permute(0, 3, 1, 2) for s in states]
                j = self.config.out_interaction_indexes.index(i)
                intermediates.append(self.intermediate_merges[j](maps) if self._merges else maps[-1])
        maps = [s.x.permute(0, 3, 1, 2) for s in states]
        out = PIIPOutput(branch_maps=maps, cls_tokens=[s.prefix for s in states])
        out.features = self.merge(maps) if self.merge is not None else maps[-1]
        if self.pyramid is not None:
            levels = intermediates + [out.features] if intermediates else [out.features] * 4
            out.pyramid = [level.float() for level in self.pyramid(levels)]
        if self.classifier is not None:
            if isinstance(self.classifier, BranchClassifier):
                out.logits = self.classifier(out.cls_tokens, [s.x for s in states])
            else:
                out.logits = self.classifier(out.features)
        return out

    def _interact(
        self, unit: BidirectionalInteraction, small: BranchState, large: BranchState
    ) -> tuple[BranchState, BranchState]:
        args = (small.x.flatten(1, 2), small.grid, large.x.flatten(1, 2), large.grid)
        if self.grad_checkpointing and small.x.requires_grad:
            new_small, new_large = checkpoint(unit, *args, use_reentrant=False)
        else:
            new_small, new_large = unit(*args)
        return (
            BranchState(new_small.view_as(small.x), small.prefix),
            BranchState(new_large.view_as(large.x), large.prefix),
        )

    def unread_parameters(self) -> list[str]:
        """Parameters that cannot influence any output this configuration produces.

        With per-branch cls-token classification and no merging, the last interaction stage is unread:
        interactions never touch cls tokens and no block follows the last one. Its units still run and
        count (as upstream counts them); tasks freeze them so DDP sees no parameter without a gradient.
        """
        reads_cls_only = isinstance(self.classifier, BranchClassifier) and self.classifier.token == "cls"
        if not reads_cls_only or self.merge is not None or self.pyramid is not None:
            return []
        last = self.num_interactions - 1
        return [f"interactions.{last}.{n}" for n, _ in self.interactions[last].named_parameters()]

    # -- timm-style verbs ---------------------------------------------------------------------------------
    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward(images).features

    def shard_units(self) -> list[nn.Module]:
        """Every branch block and interaction unit: what FSDP gathers one at a time
        (piip.distributed.fsdp)."""
        blocks = [block for branch in self.branches for block in branch.blocks]
        return blocks + [unit for stage in self.interactions for unit in stage]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per branch block and per interaction unit."""
        self.grad_checkpointing = enable
        for branch in self.branches:
            branch.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        names = {f"branches.{k}.{n}" for k, b in enumerate(self.branches) for n in b.no_weight_decay()}
        merge_weight = re.compile(r"^(merge|intermediate_merges\.\d+)\.weights$")
        names |= {
            n
            for n, _ in self.named_parameters()
            if n.endswith(("ca_gamma", "cffn_gamma")) or merge_weight.match(n)
        }
        return names

    @property
    def num_decay_layers(self) -> int:
        return self.config.layer_decay_num_layers or self.branches[-1].depth

    def layer_id(self, param_name: str) -> float:
        """Depth of a parameter for layer-wise lr decay, in [0, num_layers + 1] (PAPER.md §3.7).

        Embeddings -> 0; block i of branch k -> (i + 1) * stride_k with stride_k = num_layers / depth_k
        (upstream's skip_stride: 2 for 12-block branches beside a 24-block one); ConvNeXt blocks included;
        everything new (interactions, merges, heads) -> num_layers + 1.
        """
        num_layers = self.num_decay_layers
        match = re.match(r"branches\.(\d+)\.(.+)", param_name)
        if match:
            k = int(match.group(1))
            index = self.branches[k].block_index(match.group(2))
            if index == -1:
                return 0.0
            if index is not None:
                strides = self.config.layer_decay_strides
                stride = strides[k] if strides else num_layers / self.branches[k].depth
                return (index + 1) * stride
        return float(num_layers + 1)

    def group_matcher(self, coarse: bool = False) -> Callable[[str], float]:
        """timm's hook for layer-wise lr decay: a callable from parameter name to depth."""
        return self.layer_id


def _check_branch_settings(config: PIIPConfig) -> None:
    n = config.num_branches
    names = ", ".join(b.name for b in config.branches)
    if not isinstance(config.resolutions, list | tuple):
        raise ConfigError(f"model.resolutions: expected a list of image sizes, got {config.resolutions!r}")
    for k, res in enumerate(config.resolutions):
        whole_number(res, f"model.resolutions[{k}] (branch {k}'s image size in pixels)")
    if len(config.resolutions) != n:
        raise ConfigError(
            f"model.resolutions: got {len(config.resolutions)} values {list(config.resolutions)} for {n} "
            f"branch(es) ({names}); expected one resolution per branch, highest first"
        )
    if list(config.resolutions) != sorted(config.resolutions, reverse=True):
        raise ConfigError(
            f"model.resolutions {list(config.resolutions)}: expected the highest resolution first "
            f"(branch order is smallest model / highest resolution first: {names})"
        )
    for k, (spec, res) in enumerate(zip(config.branches, config.resolutions, strict=True)):
        unit, reason = branch_class(spec).input_multiple(spec)
        if res % unit:
            raise ConfigError(
                f"model.resolutions[{k}] = {res} for branch {spec.name}: expected a multiple of {unit} "
                f"({reason})"
            )
    if config.window is not None and config.use_cls_token:
        raise ConfigError("model.window: window attention cannot be combined with use_cls_token (cls tokens)")
    if config.merge == "regular_fpn" and len(config.out_interaction_indexes) != 3:
        raise ConfigError(
            f"model.out_interaction_indexes: regular_fpn needs exactly 3 intermediate stages, "
            f"got {config.out_interaction_indexes}"
        )
    if config.merge != "regular_fpn" and config.out_interaction_indexes:
        raise ConfigError("model.out_interaction_indexes is only used with merge=regular_fpn")
    if config.head == "pyramid" and config.merge not in ("simple_fpn", "regular_fpn") and n > 1:
        raise ConfigError(
            f"model.head=pyramid needs merge=simple_fpn or regular_fpn, got merge={config.merge}"
        )


def _check_out_interaction_indexes(indexes: list[int], num_interactions: int) -> None:
    """Intermediate maps come from distinct earlier stages, in order (the last stage gives the final map)."""
    last = num_interactions - 2
    if indexes and (list(indexes) != sorted(set(indexes)) or indexes[0] < 0 or indexes[-1] > last):
        raise ConfigError(
            f"model.out_interaction_indexes {list(indexes)}: expected strictly increasing stage indexes "
            f"in 0..{last} ({num_interactions} interaction stages; the last one gives the final map)"
        )


def _check_widths(config: PIIPConfig, backbone: PIIPBackbone) -> None:
    """Every width must suit GroupNorm(32) and the deformable heads before any module is built."""
    heads, ratio = config.interaction.num_heads, config.interaction.ratio
    if config.num_branches > 1:
        for branch, ranges in zip(backbone.branches, backbone.stage_ranges, strict=True):
            for _, end in ranges:
                dim = branch.dims[end]
                if dim % heads or int(dim * ratio) % heads:
                    raise ConfigError(
                        f"branch {branch.name}: width {dim} after block {end} does not suit the interaction: "
                        f"model.interaction.num_heads={heads} must divide {dim} and {dim} * ratio {ratio}"
                    )
    uses_group_norm = (config.num_branches > 1 and config.merge != "none") or config.head == "pyramid"
    if uses_group_norm:
        dims = (
            {b.name: b.dim for b in backbone.branches}
            if config.merge == "classification"
            else {backbone.branches[-1].name: backbone.branches[-1].dim}
        )
        for i in config.out_interaction_indexes:  # already checked to be earlier stages
            end = backbone.stage_ranges[-1][i][1]
            dims[f"{backbone.branches[-1].name}@stage{i}"] = backbone.branches[-1].dims[end]
        for name, dim in dims.items():
            if dim % 32:
                raise ConfigError(
                    f"branch {name}: width {dim} is not divisible by 32, which GroupNorm(32) in "
                    f"model.merge={config.merge} / the pyramid needs"
                )
