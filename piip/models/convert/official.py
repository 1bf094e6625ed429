"""The official PIIP backbone's parameter names -> `PIIPBackbone`'s (PAPER.md §1-2 name the modules).

Upstream numbers branches from the largest model (`branch1`, lowest resolution) to the smallest; piip from the
smallest (`branches.0`, highest resolution). With N branches, upstream `branchK` is piip `branches.{N-K}`, the
unit `interaction_units_{K}{K+1}` joins piip branches N-K-1 (small) and N-K (large), and inside it upstream's
`branch2to1_*` (small -> large) is piip's `small_to_large*`. Scalar merge weights `w1..wN` become one vector.

Every key is placed or reported: `convert_backbone` returns the piip tensors, the keys it could not place,
and the keys the official forward never reads (e.g. ConvNeXt's final pooled norm), each with the reason.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from piip.models.branches.base import UNUSED_BY_OFFICIAL

StateDict = dict[str, torch.Tensor]

# Sequential indices of upstream's merge modules -> piip's, per merge kind and role (PAPER.md §1.6).
_MERGE_INDEX = {
    ("simple_fpn", False): {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1"},
    ("simple_fpn", True): {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1"},
    ("regular_fpn", False): {"0": "0", "1": "1"},
    ("regular_fpn", True): {"0": "0"},
    ("classification", False): {"0": "0", "2": "1", "4": "2"},
    ("classification", True): {"": ""},  # a bare GroupNorm
}
_UNIT = {
    "branch2to1_proj": "small_to_large_proj",
    "branch1to2_proj": "large_to_small_proj",
    "branch2to1_injector": "small_to_large",
    "branch1to2_injector": "large_to_small",
}
_PATTERNS = {
    "branch": re.compile(r"^branch(\d+)\.(.+)$"),
    "unit": re.compile(r"^interactions\.(\d+)\.interaction_units_(\d)(\d)\.(\w+?)\.(.+)$"),
    "merge": re.compile(r"^merge_branch(\d+)\.?(\d*)\.?(.*)$"),
    "weight": re.compile(r"^w(\d+)$"),
    "intermediate": re.compile(r"^intermediate_merging_(\d+)_branch(\d+)\.(\d+)\.(.+)$"),
    "intermediate_weight": re.compile(r"^intermediate_merging_(\d+)_w(\d+)$"),
    "fpn": re.compile(r"^fpn([1-4])\.(\d+)\.(.+)$"),
    "cls_head": re.compile(r"^cls_(norm|head)\.(.+)$"),
}


@dataclass
class Conversion:
    """piip tensors, official keys nothing maps to, and official keys its forward never reads (key -> why)."""

    state_dict: StateDict = field(default_factory=dict)
    unplaced: list[str] = field(default_factory=list)
    unused: dict[str, str] = field(default_factory=dict)
    passed_through: dict[str, str] = field(default_factory=dict)  # piip key -> the official key it kept

    def update(self, other: Conversion) -> None:
        self.state_dict.update(other.state_dict)
        self.unplaced += other.unplaced
        self.unused.update(other.unused)
        self.passed_through.update(other.passed_through)


def convert_backbone(backbone: torch.nn.Module, state: StateDict) -> Conversion:
    """`state`: the official backbone's keys (no `backbone.` prefix); returns keys of `backbone`."""
    n = len(backbone.branches)
    if n == 1 and not any(_PATTERNS["branch"].match(k) for k in state):
        state = _single_branch(state)
    result = Conversion()
    per_branch: dict[int, StateDict] = defaultdict(dict)
    merge_weights: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    kind = backbone.config.merge
    for key, value in state.items():
        if match := _PATTERNS["branch"].match(key):
            k, rest = n - int(match.group(1)), match.group(2)
            if not 0 <= k < n:
                result.unplaced.append(key)
            elif head := re.match(r"^(norm|head)\.(weight|bias)$", rest):  # per-branch classifier
                part = "norms" if head.group(1) == "norm" else "fcs"
                target = f"classifier.{part}.{k}.{head.group(2)}"
                if backbone.classifier is not None and hasattr(backbone.classifier, part):
                    result.state_dict[target] = value
                else:
                    result.unused[key] = "a branch's own norm/head, which this classifier does not read"
            else:
                per_branch[k][rest] = value
        elif match := _PATTERNS["unit"].match(key):
            stage, large, small, part, rest = match.groups()
            if part not in _UNIT or int(small) != int(large) + 1 or not 1 <= int(large) < n:
                result.unplaced.append(key)
                continue
            rest = rest.replace("ffn.dwconv.dwconv.", "ffn.dwconv.")
            result.state_dict[f"interactions.{stage}.{n - int(small)}.{_UNIT[part]}.{rest}"] = value
        elif match := _PATTERNS["merge"].match(key):
            k, index, rest = n - int(match.group(1)), match.group(2), match.group(3)
            mapped = _MERGE_INDEX.get((kind, k == n - 1), {}).get(index)
            if mapped is None or not 0 <= k < n:
                result.unplaced.append(key)
                continue
            result.state_dict[".".join(p for p in ("merge.projections", str(k), mapped, rest) if p)] = value
        elif match := _PATTERNS["weight"].match(key):
            merge_weights["merge.weights"][n - int(match.group(1))] = value
        elif match := _PATTERNS["intermediate"].match(key):
            stage, branch, index, rest = match.groups()
            j = _out_index(backbone, int(stage))
            k = n - int(branch)
            mapped = _MERGE_INDEX.get((kind, k == n - 1), {}).get(index)
            if j is None or mapped is None:
                result.unplaced.append(key)
                continue
            result.state_dict[f"intermediate_merges.{j}.projections.{k}.{mapped}.{rest}"] = value
        elif match := _PATTERNS["intermediate_weight"].match(key):
            j = _out_index(backbone, int(match.group(1)))
            if j is None:
                result.unplaced.append(key)
                continue
            merge_weights[f"intermediate_merges.{j}.weights"][n - int(match.group(2))] = value
        elif match := _PATTERNS["fpn"].match(key):
            level, index, rest = match.groups()
            if backbone.pyramid is not None and int(level) - 1 not in backbone.pyramid.keep:
                result.unused[key] = (
                    f"upstream's stride-{2 ** (int(level) + 1)} tap, a level this pyramid leaves out"
                )
                continue
            prefix = f"pyramid.taps.{int(level) - 1}"
            result.state_dict[f"{prefix}.{index}.{rest}" if level == "1" else f"{prefix}.{rest}"] = value
        elif match := _PATTERNS["cls_head"].match(key):
            part = "norm" if match.group(1) == "norm" else "fc"
            result.state_dict[f"classifier.{part}.{match.group(2)}"] = value
        else:
            result.unplaced.append(key)
    for name, values in merge_weights.items():
        if sorted(values) != list(range(n)):
            result.unplaced += [f"{name}: weights for branches {sorted(values)} of 0..{n - 1}"]
            continue
        result.state_dict[name] = torch.stack([values[k].reshape(()) for k in range(n)])
    for k, tensors in per_branch.items():
        result.update(_convert_branch(backbone.branches[k], k, n - k, tensors))
    return result


def _single_branch(state: StateDict) -> StateDict:
    """Upstream's single-branch baselines are the branch module itself (`vit_models`, `InternViT6B`,
    `ConvNextHFWrapper`) with its own simple pyramid `up1..up4`: named here as a 1-branch PIIP model."""
    out: StateDict = {}
    for key, value in state.items():
        match = re.match(r"^up([1-4])\.(.+)$", key)
        out[f"fpn{match.group(1)}.{match.group(2)}" if match else f"branch1.{key}"] = value
    return out


def _out_index(backbone: torch.nn.Module, stage: int) -> int | None:
    indexes = list(backbone.config.out_interaction_indexes)
    return indexes.index(stage) if stage in indexes else None


def _convert_branch(branch: torch.nn.Module, k: int, official_k: int, tensors: StateDict) -> Conversion:
    result = Conversion()
    for key, value in branch.from_official(tensors).items():
        if key.startswith(UNUSED_BY_OFFICIAL):
            name, _, why = key.removeprefix(UNUSED_BY_OFFICIAL).partition("|")
            result.unused[f"branch{official_k}.{name}"] = why
        else:
            result.state_dict[f"branches.{k}.{key}"] = value
            if key in tensors:  # a name the adapter did not rename: if the model lacks it, it is upstream's
                result.passed_through[f"branches.{k}.{key}"] = f"branch{official_k}.{key}"
    return result
