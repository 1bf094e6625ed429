"""Loading pretrained branch weights from local files (nothing is ever downloaded).

Steps: read the file with `weights_only=True`, unwrap `model`/`state_dict`/`module`, convert the file's naming
to timm's (`CHECKPOINT_FORMATS`), let the branch resample position embeddings / patch kernels and apply
timm's own filter, then load non-strictly and report what was missing or unexpected.
"""

from __future__ import annotations

import argparse
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


CHECKPOINT_FORMATS: dict[str, Callable[[StateDict], StateDict]] = {
    "timm": lambda state_dict: state_dict,
    "internvl": _internvl_to_timm,
}


def read_state_dict(path: str | Path) -> StateDict:
    """Tensors of a `.pth`/`.pt`/`.bin` or `.safetensors` file, unwrapped from common containers."""
    path = Path(path)
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


def load_branch_checkpoint(branch: Branch, path: str | Path | None) -> LoadReport:
    """Load `path` into `branch`; shape mismatches are errors, missing/unexpected keys are logged."""
    if path is None:
        raise ValueError(
            f"branch {branch.name}: no pretrained checkpoint configured (branch.pretrained is null)"
        )
    path = Path(path)
    if not path.is_file():
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
    state_dict = branch.adapt_state_dict(CHECKPOINT_FORMATS[fmt](read_state_dict(path)))
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
