"""Branch adapters: one interface over pretrained timm models (`base.Branch`), one file per family (the file
is named like the family: vit, beit, convnext), and the checkpoint formats they load."""

from piip.models.branches.base import Branch, BranchState, branch_class, build_branch, known_families

__all__ = ["Branch", "BranchState", "branch_class", "build_branch", "known_families"]
