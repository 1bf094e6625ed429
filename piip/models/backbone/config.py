"""Plain-data configuration of a PIIP backbone (no Hydra needed; Hydra configs map onto these fields).

Branch order everywhere in piip: **highest resolution / smallest model first**, largest model last — the
order of the paper's names and resolution strings (PIIP-TSB 1568/896/448 = T@1568, S@896, B@448).
Upstream calls the largest model "branch1"; here it is `branches[-1]`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from piip.errors import ConfigError


@dataclass
class BranchSpec:
    """One pretrained branch: which architecture, which checkpoint, and per-model settings."""

    name: str
    family: str  # the adapter: a module of piip.models.branches (vit, beit, convnext, ...)
    timm_model: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    patch_size: int = 16
    pretrain_img_size: int = 224  # the stored pos-embed grid is pretrain_img_size // patch_size
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-6
    qk_norm: Literal["none", "head", "all"] = "none"
    window_pad: Literal["qkv", "tokens"] = "qkv"
    # "gelu_tanh": upstream's mlp_type='fused_mlp' (flash-attn FusedMLP, tanh-approximated GELU) of the
    # speed-up, segmentation and LH6B rows, which the released weights were fine-tuned with (PAPER.md §7.10)
    mlp_activation: Literal["gelu", "gelu_tanh"] = "gelu"
    drop_path_rate: float = 0.0
    drop_path_schedule: Literal["constant", "linear"] = "constant"
    interaction_indexes: list[list[int]] | None = None  # None: split the blocks evenly
    pretrained: str | None = None
    checkpoint_format: str = "timm"
    checkpoint_source: str | None = None  # where the public file comes from (documentation only)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "branch") -> BranchSpec:
        return _from_dict(cls, data, where)


@dataclass
class InteractionConfig:
    """Hyper-parameters shared by every injector (PAPER.md §2, §3.2)."""

    attn_type: Literal["deform", "cross"] = "deform"
    num_heads: int = 16
    num_points: int = 4
    ratio: float = 0.5
    with_cffn: bool = True
    cffn_ratio: float = 0.25
    drop_path: float = 0.4
    with_proj: bool = True
    norm: Literal["layernorm", "none"] = "layernorm"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "interaction") -> InteractionConfig:
        return _from_dict(cls, data, where)


@dataclass
class WindowConfig:
    """Window attention for every attention branch; `global_every=k` keeps blocks k-1, 2k-1, ... global."""

    size: int
    global_every: int | None = None

    def window_for_block(self, index: int) -> int | None:
        if self.global_every and index % self.global_every == self.global_every - 1:
            return None
        return self.size


@dataclass
class PIIPConfig:
    """Everything that shapes a `PIIPBackbone`."""

    branches: list[BranchSpec]
    resolutions: list[int]
    num_interactions: int = 12
    interaction: InteractionConfig = field(default_factory=InteractionConfig)
    window: WindowConfig | None = None
    merge: Literal["simple_fpn", "regular_fpn", "classification", "none"] = "simple_fpn"
    out_interaction_indexes: list[int] = field(default_factory=list)
    head: Literal["pyramid", "classification", "none"] = "pyramid"
    pyramid_norm: Literal["groupnorm", "layernorm"] = "groupnorm"  # layernorm: upstream's ViT baselines
    pyramid_strides: list[int] = field(default_factory=lambda: [4, 8, 16, 32])  # DINO reads [8, 16, 32]
    classifier: Literal["merged", "per_branch"] = "merged"
    classifier_token: Literal["cls", "first_patch"] = "cls"
    num_classes: int = 1000
    use_cls_token: bool = False  # branches that have a cls token carry it through their blocks
    pos_embed_at_resolution: bool = False  # size each pos-embed at the branch resolution (paper FLOP twin)
    attention_backend: Literal["sdpa", "flash"] = "sdpa"
    deformable_backend: Literal["auto", "torch", "triton"] = "auto"  # auto: Triton kernel on CUDA
    layer_decay_num_layers: int | None = None  # default: depth of the largest branch
    layer_decay_strides: list[float] | None = None  # default: num_layers / depth per branch

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PIIPConfig:
        data = dict(data)
        if "branches" not in data or not data["branches"]:
            raise ConfigError("model.branches: expected a list of at least one branch, got none")
        data["branches"] = [
            b if isinstance(b, BranchSpec) else BranchSpec.from_dict(b, f"model.branches[{i}]")
            for i, b in enumerate(data["branches"])
        ]
        if isinstance(data.get("interaction"), dict):
            data["interaction"] = InteractionConfig.from_dict(data["interaction"], "model.interaction")
        if isinstance(data.get("window"), dict):
            data["window"] = _from_dict(WindowConfig, data["window"], "model.window")
        return _from_dict(cls, data, "model")

    @property
    def num_branches(self) -> int:
        return len(self.branches)


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(known)}")
    try:
        return cls(**data)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from err


def split_evenly(depth: int, groups: int) -> list[list[int]]:
    """Contiguous [start, end] block ranges, smaller groups first (upstream's MAE-H 32/12 pattern)."""
    if groups < 1 or groups > depth:
        raise ConfigError(f"cannot split {depth} blocks into {groups} interaction stages")
    base, extra = divmod(depth, groups)
    sizes = [base] * (groups - extra) + [base + 1] * extra
    ranges, start = [], 0
    for size in sizes:
        ranges.append([start, start + size - 1])
        start += size
    return ranges


def check_interaction_indexes(indexes: list[list[int]], depth: int, where: str) -> None:
    """Ranges must be contiguous, inclusive and cover blocks 0..depth-1 exactly once."""
    expected_start = 0
    for i, pair in enumerate(indexes):
        if len(pair) != 2 or pair[0] != expected_start or pair[1] < pair[0]:
            raise ConfigError(
                f"{where}[{i}] = {pair}: expected [start, end] with start = {expected_start} "
                f"(ranges must be contiguous, inclusive and cover every block once)"
            )
        expected_start = pair[1] + 1
    if expected_start != depth:
        raise ConfigError(f"{where} covers blocks 0..{expected_start - 1} but the branch has {depth} blocks")
