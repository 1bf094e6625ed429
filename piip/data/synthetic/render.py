"""Rasterising a `Scene`: the RGB image, per-instance visible masks, the semantic map and boxes.

Every writer renders through here, so the image a format stores and the masks, labels and boxes it
annotates come from the same outlines. The image is anti-aliased (drawn at 2x and box-filtered down); the
masks are hard: the masks are the ground truth, the image is what a camera would see.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from piip.data.synthetic.scene import SHAPE_CLASSES, Background, Scene, ShapeInstance

__all__ = [
    "JPEG_OPTIONS",
    "instance_boxes",
    "render_image",
    "render_instance_masks",
    "render_semantic",
    "visible_areas",
]

_SUPERSAMPLE = 2  # the RGB image is drawn at 2x and box-filtered down: cheap anti-aliasing
# How the writers save JPEG images: high quality without chroma subsampling, so colours stay clean.
JPEG_OPTIONS: dict[str, Any] = {"quality": 95, "subsampling": 0}

# ---------------------------------------------------------------------------------------------- geometry


def _regular_polygon(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    outer = _regular_polygon(2 * points)
    return outer * np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)[:, None]


def _cross(arm: float = 0.3) -> np.ndarray:
    a = arm
    return np.array(
        [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a)]
        + [(-a, -a)],
        dtype=float,
    )


# Per class: (outline in unit coordinates, fill) in drawing order; fill 0 cuts a hole (the ring).
# Outlines span about [-1, 1] on both axes, so shapes of equal `size` look equally big (the square's and
# the triangle's corners reach a little beyond the unit circle).
_UNIT_SHAPES: dict[str, list[tuple[np.ndarray, int]]] = {
    "circle": [(_regular_polygon(48), 1)],
    "cross": [(_cross(), 1)],
    "diamond": [(np.array([(0, -1), (0.6, 0), (0, 1), (-0.6, 0)], dtype=float), 1)],
    "hexagon": [(_regular_polygon(6), 1)],
    "ring": [(_regular_polygon(48), 1), (_regular_polygon(48, radius=0.55), 0)],
    "square": [(_regular_polygon(4, radius=0.85 * math.sqrt(2), phase=-math.pi / 4), 1)],
    "star": [(_star(), 1)],
    "triangle": [(_regular_polygon(3, radius=1.1), 1)],
}
assert tuple(_UNIT_SHAPES) == SHAPE_CLASSES == tuple(sorted(SHAPE_CLASSES))


def _outlines(instance: ShapeInstance, scale: float) -> list[tuple[list[tuple[float, float]], int]]:
    """The instance's outlines in PIL coordinates of a canvas `scale` times the scene size.

    PIL puts integer coordinates at pixel centres, hence the half-pixel shift."""
    theta = math.radians(instance.rotation)
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    radius = instance.size / 2
    stretch = np.array([radius * instance.aspect, radius])
    centre = np.asarray(instance.centre)
    result = []
    for unit, fill in _UNIT_SHAPES[instance.class_name]:
        points = ((unit * stretch) @ rotation.T + centre) * scale - 0.5
        result.append(([(float(x), float(y)) for x, y in points], fill))
    return result


def _silhouette(instance: ShapeInstance, width: int, height: int, scale: int = 1) -> Image.Image:
    """Full (pre-occlusion) mask of one instance as a mode-"L" image of 0/255."""
    mask = Image.new("L", (width * scale, height * scale), 0)
    draw = ImageDraw.Draw(mask)
    for points, fill in _outlines(instance, scale):
        draw.polygon(points, fill=255 * fill)
    return mask


# --------------------------------------------------------------------------------------------- rendering


def _render_background(background: Background, width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8 background; resolution-independent apart from sampling."""
    base = np.asarray(background.colour, dtype=np.float32)
    if background.kind == "flat":
        return np.broadcast_to(base.astype(np.uint8), (height, width, 3)).copy()
    if background.kind == "gradient":
        theta = math.radians(background.angle)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        t = (xs + 0.5) / width * math.cos(theta) + (ys + 0.5) / height * math.sin(theta)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        end = np.asarray(background.colour_to, dtype=np.float32)
        pixels = base + t[..., None] * (end - base)
    elif background.kind == "noise":
        rng = np.random.default_rng(background.noise_seed)
        cells = background.noise_cells
        grid = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
        smooth = Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)
        noise = np.asarray(smooth, dtype=np.float32) / 127.5 - 1.0
        pixels = base + background.noise_amplitude * noise
    else:
        raise ValueError(f"unknown background kind {background.kind!r}")
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def render_image(scene: Scene) -> Image.Image:
    """The scene as an RGB image of `scene.width` x `scene.height`, anti-aliased by supersampling.

    Shape edges are therefore soft over about one pixel, while the masks below are hard: the masks are the
    ground truth, the image is what a camera would see."""
    s = _SUPERSAMPLE
    canvas = Image.fromarray(_render_background(scene.background, scene.width * s, scene.height * s))
    for instance in scene.instances:
        canvas.paste(instance.colour, mask=_silhouette(instance, scene.width, scene.height, s))
    return canvas.resize((scene.width, scene.height), Image.Resampling.BOX)


def _full_masks(scene: Scene) -> list[np.ndarray]:
    """Pre-occlusion bool silhouettes (clipped to the image), one per instance."""
    return [np.asarray(_silhouette(i, scene.width, scene.height)) > 0 for i in scene.instances]


def _occlude(full: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Visible masks from paint-ordered silhouettes: a pixel belongs to the topmost instance covering it."""
    if not full:
        return []
    visible = list(full)
    covered = np.zeros_like(full[0])
    for i in reversed(range(len(full))):
        visible[i] = full[i] & ~covered
        covered = covered | full[i]
    return visible


def render_instance_masks(scene: Scene) -> list[np.ndarray]:
    """Visible (after occlusion) bool masks of shape (height, width), one per instance, in instance order.

    Masks are pairwise disjoint; a pixel belongs to the topmost instance covering it."""
    return _occlude(_full_masks(scene))


def render_semantic(scene: Scene, masks: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """(height, width) uint8 map: 0 = background, `class_index + 1` where an instance is visible.

    Pass `masks` from `render_instance_masks` to avoid rasterising twice."""
    if masks is None:
        masks = render_instance_masks(scene)
    semantic = np.zeros((scene.height, scene.width), dtype=np.uint8)
    for instance, mask in zip(scene.instances, masks, strict=True):
        semantic[mask] = instance.class_index + 1
    return semantic


def instance_boxes(masks: Sequence[np.ndarray]) -> np.ndarray:
    """(N, 4) int64 boxes x0, y0, x1, y1 in pixel-edge coordinates (exclusive x1, y1), so a mask pixel
    (x, y) lies in [x0, x1) x [y0, y1). Raises on an empty mask: such an instance has no box."""
    boxes = np.zeros((len(masks), 4), dtype=np.int64)
    for i, mask in enumerate(masks):
        ys = np.flatnonzero(mask.any(axis=1))
        xs = np.flatnonzero(mask.any(axis=0))
        if len(xs) == 0:
            raise ValueError(f"instance {i} has an empty visible mask and therefore no box")
        boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
    return boxes


def visible_areas(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """(visible pixel count, in-image silhouette pixel count) per instance."""
    full = _full_masks(scene)
    visible = _occlude(full)
    return np.array([int(m.sum()) for m in visible]), np.array([int(m.sum()) for m in full])
