"""The scene model of the embedded "shapes" data: plain data that every format is rendered from.

A `Scene` is a background and shape instances in paint order. It is sampled by `sampling.sample_scene`,
rasterised by `render` (RGB image, per-instance visible masks, semantic map, boxes) and written by one
module per format (`imagenet`, `coco`, `ade20k`, `llava`), so every format derives its files from one model.

Class names: `SHAPE_CLASSES` is kept in alphabetical order and the ImageNet class folders carry the plain
names, so `torchvision.datasets.ImageFolder` (which sorts folder names) assigns index `i` to
`SHAPE_CLASSES[i]`, and the same names can serve as COCO categories and ADE20K labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "GENERATOR_ID",
    "GENERATOR_VERSION",
    "RGB",
    "SHAPE_CLASSES",
    "SPLITS",
    "Background",
    "BackgroundKind",
    "Scene",
    "ShapeInstance",
]

# Alphabetical on purpose: sorted folder names == SHAPE_CLASSES order (see the module docstring).
SHAPE_CLASSES: tuple[str, ...] = (
    "circle",
    "cross",
    "diamond",
    "hexagon",
    "ring",
    "square",
    "star",
    "triangle",
)
# Bump whenever a change alters generated pixels or layout, so stale data directories are detected.
GENERATOR_VERSION = 1
# The "generator" the ImageNet, COCO and ADE20K manifests carry: the module that wrote them before the
# package was split into one module per job. Kept as is so directories generated earlier stay reusable.
GENERATOR_ID = "piip.data.synthetic.shapes"
SPLITS: tuple[str, ...] = ("train", "val")

RGB = tuple[int, int, int]
BackgroundKind = Literal["flat", "gradient", "noise"]


@dataclass(frozen=True)
class ShapeInstance:
    """One filled shape. Geometry is in pixels of the scene: `size` is the nominal diameter (the outline
    spans about `size` along each axis before the `aspect` stretch of x), `rotation` is in degrees."""

    class_index: int
    centre: tuple[float, float]
    size: float
    rotation: float
    colour: RGB
    aspect: float = 1.0

    @property
    def class_name(self) -> str:
        return SHAPE_CLASSES[self.class_index]


@dataclass(frozen=True)
class Background:
    """What is behind the shapes: a flat colour, a linear gradient from `colour` to `colour_to` along
    `angle` (degrees), or `colour` plus smooth per-channel value noise on a `noise_cells` grid."""

    kind: BackgroundKind
    colour: RGB
    colour_to: RGB | None = None
    angle: float = 0.0
    noise_amplitude: float = 0.0
    noise_cells: int = 4
    noise_seed: int = 0


@dataclass(frozen=True)
class Scene:
    """Plain data from which every format is rendered. `instances` are in paint order (last on top);
    `subject_index` marks the instance whose class is the classification label (dominant scenes)."""

    width: int
    height: int
    background: Background
    instances: tuple[ShapeInstance, ...] = field(default_factory=tuple)
    subject_index: int | None = None

    @property
    def label(self) -> int | None:
        """Class index of the subject, or None for multi-object scenes."""
        return None if self.subject_index is None else self.instances[self.subject_index].class_index
