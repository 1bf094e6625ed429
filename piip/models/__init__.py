"""Pure torch/timm/torchvision modules: no Lightning, no Hydra, no OmegaConf. A plain `PIIPConfig` builds a
backbone in a notebook; the presets in conf/ are composed by `piip.run.presets`."""

from piip.models.backbone import (
    BranchSpec,
    InteractionConfig,
    PIIPBackbone,
    PIIPConfig,
    PIIPOutput,
    WindowConfig,
)
from piip.models.branches import Branch, BranchState, build_branch, known_families

__all__ = [
    "Branch",
    "BranchSpec",
    "BranchState",
    "InteractionConfig",
    "PIIPBackbone",
    "PIIPConfig",
    "PIIPOutput",
    "WindowConfig",
    "build_branch",
    "known_families",
]
