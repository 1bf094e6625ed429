"""Branch adapters: one interface over pretrained timm models, one file per family, and the checkpoint
formats they load."""

from piip.models.branches.adapters import BRANCH_FAMILIES, Branch, BranchState, build_branch

__all__ = ["BRANCH_FAMILIES", "Branch", "BranchState", "build_branch"]
