"""The PIIP backbone: its plain-data config, the interactions (deformable attention), branch merging and the
pyramid taps. Branches come from `piip.models.branches`."""

from piip.models.backbone.backbone import PIIPBackbone, PIIPOutput
from piip.models.backbone.config import BranchSpec, InteractionConfig, PIIPConfig, WindowConfig

__all__ = ["BranchSpec", "InteractionConfig", "PIIPBackbone", "PIIPConfig", "PIIPOutput", "WindowConfig"]
