"""What every detector on a PIIP backbone is, and how `task.module.detector.name` finds one.

A detector owns its neck and heads and runs the backbone itself, as torchvision's `GeneralizedRCNN` does:
data flows one way, task -> detector -> losses or detections. The backbone is *referenced*, not registered:
the task registers it once as `backbone.*` (checkpoint keys, layer-wise lr decay and FSDP units see one copy
under one name for every task), so the detector's own parameters are only its neck and heads.

A new detector is one module of this package, named like the detector (`dino.py` for `name: dino`), holding
one `Detector` subclass that sets `name`; nothing else lists detectors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from piip.models.registry import Registry

DEFAULT_DETECTOR = "mask_rcnn"
DETECTORS: Registry[Detector] = Registry("piip.models.heads", "detector")  # filled as detectors are imported


class Detector(nn.Module, ABC):
    """A detection model around a backbone whose output has a `pyramid` (strides 4/8/16/32 unless the task
    sets `pyramid_strides`: DINO reads 8/16/32)."""

    name: ClassVar[str]
    predicts_masks: ClassVar[bool] = True  # instance masks as well as boxes (DINO: boxes only)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            DETECTORS.register(cls.name, cls)

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self._backbone = (backbone,)  # a tuple hides it from nn.Module: referenced, not registered

    @property
    def backbone(self) -> nn.Module:
        return self._backbone[0]

    @classmethod
    @abstractmethod
    def from_config(cls, backbone: nn.Module, num_classes: int, config: dict[str, Any]) -> Detector:
        """Build from `task.module.detector` (without `name`); errors name the config field."""

    @abstractmethod
    def forward(
        self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Float 0-255 images of any sizes: a dict of losses in training, per-image detections (`boxes`,
        `labels`, `scores`, optionally `masks`) at each target's `orig_size` otherwise."""

    def from_official(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """An official checkpoint's detector tensors -> the task's `detector.*` keys, and the keys not placed
        (`piip.run.convert`)."""
        from piip.errors import CheckpointError

        raise CheckpointError(f"detector {self.name!r} has no official-checkpoint naming")

    def shard_units(self) -> list[nn.Module]:
        """Layers FSDP should shard one by one (the rest of the detector is sharded as a whole)."""
        return []

    @abstractmethod
    def probe_loss(self, pyramid: list[torch.Tensor], batch_size: int) -> torch.Tensor:
        """A loss through every head whose cost does not depend on the data, at the heads' largest training
        load (`piip.analysis.memory` counts the activations it saves)."""


def stored_sizes(
    images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None
) -> list[tuple[int, int]]:
    """Each image's size in the annotation file (a target's `orig_size`), else its own: where a detector
    returns its detections."""
    return [
        tuple(int(v) for v in t["orig_size"])
        if t is not None and "orig_size" in t
        else tuple(image.shape[-2:])
        for t, image in zip(targets or [None] * len(images), images, strict=True)
    ]


def build_detector(backbone: nn.Module, num_classes: int, config: dict[str, Any] | None) -> Detector:
    """The detector `config["name"]` names (default Mask R-CNN), from the rest of `config`."""
    config = dict(config or {})
    name = config.pop("name", DEFAULT_DETECTOR)
    return detector_class(name).from_config(backbone, num_classes, config)


def detector_class(name: str) -> type[Detector]:
    return DETECTORS.get(name, "task.module.detector.name")


def available() -> list[str]:
    return DETECTORS.names()
