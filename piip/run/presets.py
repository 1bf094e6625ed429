"""Released configurations by name, composed from conf/ (the model layer knows no Hydra):

from piip.run.presets import from_preset
backbone = from_preset("piip_sbl", task="coco", resolution="1568_896_672")  # random weights
"""

from __future__ import annotations

from typing import Any

from piip.models import PIIPBackbone, PIIPConfig
from piip.run.config import backbone_dict, compose


def model_config(
    model: str, task: str = "coco", resolution: str | None = None, **overrides: Any
) -> PIIPConfig:
    """`PIIPConfig` of a preset, e.g. `model_config("piip_sbl", task="coco", resolution="1568_896_672")`."""
    args = [f"model={model}", f"task={task}"] + ([f"resolution='{resolution}'"] if resolution else [])
    args += [f"model.{k}={v}" for k, v in overrides.items()]
    return PIIPConfig.from_dict(backbone_dict(compose("flops", args)))


def from_preset(
    model: str, task: str = "coco", resolution: str | None = None, **overrides: Any
) -> PIIPBackbone:
    """Build a released configuration by name, e.g. `from_preset("piip_sbl", "coco")`."""
    return PIIPBackbone(model_config(model, task=task, resolution=resolution, **overrides))
