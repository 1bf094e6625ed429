"""Classification heads on top of the backbone (PAPER.md §1.7)."""

from __future__ import annotations

import torch
from torch import nn


class MergedClassifier(nn.Module):
    """LayerNorm over the merged map's tokens, mean pooling, Linear (upstream `separate_head=False`)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, merged: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(merged.flatten(2).transpose(1, 2)).mean(1))


class BranchClassifier(nn.Module):
    """Each branch classifies its own token; logits are averaged (upstream `separate_head=True`).

    `token="cls"` uses each branch's cls token (the intended behaviour). `token="first_patch"` reproduces the
    released classification checkpoints, which by an upstream bug classify the top-left patch token.
    """

    def __init__(self, dims: list[int], num_classes: int, token: str = "cls") -> None:
        super().__init__()
        if token not in ("cls", "first_patch"):
            raise ValueError(f"model.classifier_token: expected 'cls' or 'first_patch', got {token!r}")
        self.token = token
        self.norms = nn.ModuleList(nn.LayerNorm(d, eps=1e-6) for d in dims)
        self.fcs = nn.ModuleList(nn.Linear(d, num_classes) for d in dims)

    @torch.no_grad()
    def load_branch_head(self, k: int, tensors: dict[str, torch.Tensor]) -> bool:
        """Copy a timm checkpoint's `norm.*` and `head.*` into branch k's head if every shape fits."""
        pairs = [
            (self.norms[k].weight, "norm.weight"),
            (self.norms[k].bias, "norm.bias"),
            (self.fcs[k].weight, "head.weight"),
            (self.fcs[k].bias, "head.bias"),
        ]
        if not all(name in tensors and tensors[name].shape == p.shape for p, name in pairs):
            return False
        for param, name in pairs:
            param.copy_(tensors[name])
        return True

    def forward(self, cls_tokens: list[torch.Tensor | None], grids: list[torch.Tensor]) -> torch.Tensor:
        logits = []
        for norm, fc, cls, grid in zip(self.norms, self.fcs, cls_tokens, grids, strict=True):
            token = cls[:, 0] if self.token == "cls" else grid[:, 0, 0]
            logits.append(fc(norm(token)))
        return torch.stack(logits).mean(0)
