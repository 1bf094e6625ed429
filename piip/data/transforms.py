"""Geometric augmentation for detection: keep-ratio resize rules, multi-scale, crops (torchvision v2).

Every transform takes and returns `(image, target)` with `tv_tensors` (Image, BoundingBoxes, Mask), so
boxes and masks move with the pixels; plain tensors (labels, image ids) pass through untouched. The resize
rule is mmdet's `keep_ratio` one: scale by `min(long / longer side, short / shorter side)`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from piip.errors import ConfigError

Scale = tuple[int, int]  # (long side, short side)


def keep_ratio_size(height: int, width: int, scale: Scale) -> tuple[int, int]:
    """Output (height, width) for mmdet's keep-ratio rule, rounded half up as mmcv does."""
    long, short = scale
    factor = min(long / max(height, width), short / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def _image_size(flat_inputs: list[Any]) -> tuple[int, int]:
    for item in flat_inputs:
        if isinstance(item, tv_tensors.Image):
            return tuple(item.shape[-2:])
    raise TypeError("detection transforms expect a tv_tensors.Image among their inputs")


class KeepRatioResize(v2.Transform):
    """Resize to one of `scales` (picked at random per image when there are several)."""

    def __init__(self, scales: Sequence[Scale]) -> None:
        super().__init__()
        if not scales:
            raise ValueError("KeepRatioResize needs at least one (long, short) scale")
        self.scales = [tuple(s) for s in scales]

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        scale = self.scales[0] if len(self.scales) == 1 else random.choice(self.scales)
        return {"size": list(keep_ratio_size(*_image_size(flat_inputs), scale))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=params["size"], antialias=True)


class RandomSizeCrop(v2.Transform):
    """Crop a random `h × w` window, each side uniform in [min_size, max_size] and at most the image's.

    With min_size == max_size it is mmdet's `RandomCrop(crop_size)`: images smaller than the crop are kept
    whole. Boxes are clipped to the window; `SanitizeBoundingBoxes` afterwards drops the emptied ones.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"RandomSizeCrop: expected 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = _image_size(flat_inputs)
        h = random.randint(min(self.min_size, height), min(self.max_size, height))
        w = random.randint(min(self.min_size, width), min(self.max_size, width))
        top, left = random.randint(0, height - h), random.randint(0, width - w)
        return {"top": top, "left": left, "height": h, "width": w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


@dataclass
class DetrCrop:
    """The second branch of DETR's augmentation: resize to `scales`, crop a `crop` = [min, max] window."""

    scales: list[Scale]
    crop: tuple[int, int]


@dataclass
class DetectionAugmentation:
    """`task.data` resizing settings. Every size is in pixels of the resized image.

    `scale` is the single-scale rule (the paper's PIIP configs: long = highest branch resolution, short =
    long·800/1333); `train_scales` replaces it in training with a random choice per image (multi-scale);
    `detr_crop` adds DETR's resize-crop-resize branch with probability 0.5; `crop` takes a random window of
    at most crop × crop at the end (the InternViT-6B configs). `test_scale` defaults to `scale`.
    """

    scale: Scale
    train_scales: list[Scale] | None = None
    detr_crop: DetrCrop | None = None
    crop: int | None = None
    test_scale: Scale | None = None
    flip: float = 0.5

    @classmethod
    def from_config(cls, input_size: int, **values: Any) -> DetectionAugmentation:
        def pair(name: str, value: Any) -> Scale:
            if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
                raise ConfigError(f"task.data.{name}: expected [long, short] in pixels, got {value}")
            return (int(value[0]), int(value[1]))

        scale = values.get("scale") or [input_size, input_size * 800 // 1333]
        detr = values.get("detr_crop")
        return cls(
            scale=pair("scale", scale),
            train_scales=[pair("train_scales", s) for s in values["train_scales"]]
            if values.get("train_scales")
            else None,
            detr_crop=DetrCrop([pair("detr_crop.scales", s) for s in detr["scales"]], tuple(detr["crop"]))
            if detr
            else None,
            crop=values.get("crop"),
            test_scale=pair("test_scale", values["test_scale"]) if values.get("test_scale") else None,
            flip=values.get("flip", 0.5),
        )

    def train_transform(self) -> v2.Compose:
        resize = KeepRatioResize(self.train_scales or [self.scale])
        steps: list[v2.Transform] = [v2.RandomHorizontalFlip(self.flip)]
        if self.detr_crop is not None:
            cropped = v2.Compose(
                [KeepRatioResize(self.detr_crop.scales), RandomSizeCrop(*self.detr_crop.crop), resize]
            )
            steps.append(v2.RandomChoice([resize, cropped]))
        else:
            steps.append(resize)
        if self.crop is not None:
            steps.append(RandomSizeCrop(self.crop, self.crop))
        steps.append(v2.SanitizeBoundingBoxes(min_size=1))
        return v2.Compose(steps)

    def eval_transform(self) -> v2.Compose:
        return v2.Compose([KeepRatioResize([self.test_scale or self.scale])])


def empty_target(height: int, width: int) -> dict[str, torch.Tensor]:
    """What an unannotated image carries through the transforms (for prediction on a user's image)."""
    return {
        "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(height, width)),
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": tv_tensors.Mask(torch.zeros(0, height, width, dtype=torch.uint8)),
        "image_id": torch.tensor(-1),
        "orig_size": torch.tensor([height, width]),
    }
