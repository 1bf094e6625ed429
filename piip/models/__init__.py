"""Pure torch/timm modules: no Lightning, no Hydra."""

from piip.models.backbone import PIIPBackbone, PIIPOutput
from piip.models.branches import BRANCH_FAMILIES, Branch, BranchState, build_branch
from piip.models.config import BranchSpec, ConfigError, InteractionConfig, PIIPConfig, WindowConfig

__all__ = [
    "BRANCH_FAMILIES",
    "Branch",
    "BranchSpec",
    "BranchState",
    "ConfigError",
    "InteractionConfig",
    "PIIPBackbone",
    "PIIPConfig",
    "PIIPOutput",
    "WindowConfig",
    "build_branch",
]
