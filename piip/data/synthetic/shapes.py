"""Deterministic "shapes" data: the embedded default dataset, written in the real on-disk formats.

The quick start (`python train.py`) and the test suite train on this data so that the real loading code
runs without any download. Everything starts from a `Scene` (plain data: a background and shape instances in
paint order) sampled from a seeded numpy Generator. The same scene renders to an RGB image, to per-instance
visible masks, to a semantic map and to boxes, so every format writer (ImageNet folders, COCO and ADE20K now;
LLaVA later) derives its files from one scene model.

Class names: `SHAPE_CLASSES` is kept in alphabetical order and the ImageNet class folders carry the plain
names, so `torchvision.datasets.ImageFolder` (which sorts folder names) assigns index `i` to
`SHAPE_CLASSES[i]`, and the same names can serve as COCO categories and ADE20K labels.

Determinism: every image has its own Generator seeded from `SeedSequence([seed, stream, split, class,
index])`, so the same arguments give byte-identical files and any single image can be regenerated alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "GENERATOR_VERSION",
    "MANIFEST_NAME",
    "SHAPE_CLASSES",
    "SPLITS",
    "Background",
    "Scene",
    "ShapeInstance",
    "ensure_imagenet_layout",
    "imagenet_scene",
    "instance_boxes",
    "render_image",
    "render_instance_masks",
    "render_semantic",
    "sample_scene",
    "write_imagenet_layout",
]

log = logging.getLogger(__name__)

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
MANIFEST_NAME = "piip_synthetic.json"
SPLITS: tuple[str, ...] = ("train", "val")

RGB = tuple[int, int, int]
BackgroundKind = Literal["flat", "gradient", "noise"]
ImageFormat = Literal["JPEG", "PNG"]

_IMAGENET_STREAM = 0  # first SeedSequence key after the seed; later formats take other streams
_EXTENSIONS: dict[str, str] = {"JPEG": ".JPEG", "PNG": ".png"}
_SUPERSAMPLE = 2  # the RGB image is drawn at 2x and box-filtered down: cheap anti-aliasing
_MIN_CONTRAST = 110.0  # minimum RGB distance between a shape colour and any background colour ...
_MIN_LUMA_CONTRAST = 50.0  # ... and in brightness: silhouettes must not rely on hue alone
_MIN_SHAPE_CONTRAST = 70.0  # minimum RGB distance between the colours of two shapes in one scene
_COLOUR_TRIES = 64
_GRADIENT_SPAN = 90  # per-channel change across a gradient; wider spans leave too few contrasting colours
_SUBJECT_SIZE = (0.45, 0.85)  # subject diameter as a fraction of the shorter image side
_DISTRACTOR_SIZE = (0.12, 0.22)
_SCENE_SIZE = (0.15, 0.55)  # instance sizes of multi-object (non-dominant) scenes
_SUBJECT_MIN_VISIBLE = 0.7  # the subject keeps at least this fraction of its in-image silhouette
_SUBJECT_AREA_RATIO = 1.5  # ... and at least this many times the visible area of any distractor
_MIN_VISIBLE = 0.3  # instances of multi-object scenes keep at least this fraction visible
_MIN_VISIBLE_PIXELS = 12
_LAYOUT_TRIES = 20
# Squares and diamonds only rotate a little: a square turned 45 degrees would look like a diamond.
_UPRIGHT_CLASSES = frozenset({"square", "diamond"})
_UPRIGHT_ROTATION = 20.0


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


# ---------------------------------------------------------------------------------------------- sampling


def _random_colour(rng: np.random.Generator) -> RGB:
    r, g, b = rng.integers(0, 256, size=3)
    return int(r), int(g), int(b)


def _background_distance(colour: RGB, background: Background) -> float:
    """Smallest RGB distance from `colour` to any colour the background can take."""
    c = np.asarray(colour, dtype=float)
    a = np.asarray(background.colour, dtype=float)
    b = np.asarray(background.colour_to if background.colour_to is not None else background.colour, float)
    span = b - a
    t = float(np.clip(np.dot(c - a, span) / max(float(np.dot(span, span)), 1e-9), 0.0, 1.0))
    nearest = float(np.linalg.norm(c - (a + t * span)))
    return nearest - background.noise_amplitude * math.sqrt(3)


def _luma(colour: Sequence[float]) -> float:
    r, g, b = colour
    return 0.299 * r + 0.587 * g + 0.114 * b


def _background_luma_distance(colour: RGB, background: Background) -> float:
    """Smallest brightness difference between `colour` and the background (a gradient's luma is linear)."""
    ends = [_luma(background.colour), _luma(background.colour_to or background.colour)]
    low, high = min(ends) - background.noise_amplitude, max(ends) + background.noise_amplitude
    luma = _luma(colour)
    return max(low - luma, luma - high, 0.0)


def _contrast(colour: RGB, background: Background, others: Sequence[RGB]) -> float:
    """How far `colour` is from its constraints, in units of the required distances (>= 1 is enough)."""
    score = _background_distance(colour, background) / _MIN_CONTRAST
    score = min(score, _background_luma_distance(colour, background) / _MIN_LUMA_CONTRAST)
    for other in others:
        score = min(score, math.dist(colour, other) / _MIN_SHAPE_CONTRAST)
    return score


def _shape_colour(rng: np.random.Generator, background: Background, others: Sequence[RGB] = ()) -> RGB:
    """A colour that stands out from the background (and from `others`); the best of a few tries."""
    best, best_score = _random_colour(rng), -math.inf
    for _ in range(_COLOUR_TRIES):
        colour = _random_colour(rng)
        score = _contrast(colour, background, others)
        if score >= 1.0:
            return colour
        if score > best_score:
            best, best_score = colour, score
    return best


def _sample_background(rng: np.random.Generator) -> Background:
    kind = ("flat", "gradient", "noise")[int(rng.integers(3))]
    colour = _random_colour(rng)
    if kind == "flat":
        return Background("flat", colour)
    if kind == "gradient":
        shift = rng.integers(-_GRADIENT_SPAN, _GRADIENT_SPAN + 1, size=3)
        r, g, b = np.clip(np.asarray(colour) + shift, 0, 255)
        return Background("gradient", colour, (int(r), int(g), int(b)), angle=float(rng.uniform(0, 360)))
    return Background(
        "noise",
        colour,
        noise_amplitude=float(rng.uniform(12, 35)),
        noise_cells=int(rng.integers(3, 9)),
        noise_seed=int(rng.integers(2**31)),
    )


def _sample_instance(
    rng: np.random.Generator,
    class_index: int,
    size: float,
    centre: tuple[float, float],
    background: Background,
    others: Sequence[RGB] = (),
) -> ShapeInstance:
    if SHAPE_CLASSES[class_index] in _UPRIGHT_CLASSES:
        rotation = float(rng.uniform(-_UPRIGHT_ROTATION, _UPRIGHT_ROTATION))
    else:
        rotation = float(rng.uniform(0, 360))
    return ShapeInstance(
        class_index=class_index,
        centre=centre,
        size=size,
        rotation=rotation,
        colour=_shape_colour(rng, background, others),
        aspect=float(rng.uniform(0.85, 1.15)),
    )


def _visible_areas(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """(visible pixel count, in-image silhouette pixel count) per instance."""
    full = _full_masks(scene)
    visible = _occlude(full)
    return np.array([int(m.sum()) for m in visible]), np.array([int(m.sum()) for m in full])


def _well_visible(visible: np.ndarray, full: np.ndarray) -> np.ndarray:
    """Per instance: enough of it shows to count as an object (and to get a mask and a box)."""
    return (visible >= _MIN_VISIBLE * full) & (visible >= _MIN_VISIBLE_PIXELS)


def _dominant_scene(
    rng: np.random.Generator,
    width: int,
    height: int,
    background: Background,
    subject_class: int | None,
    max_distractors: int,
) -> Scene:
    """One large subject, kept mostly inside the image, plus 0..max_distractors small shapes of other
    classes painted below or above it. Layouts that hide too much of the subject, let a distractor rival it
    or hide a distractor are resampled; after a few failures the subject is drawn alone."""
    side = min(width, height)
    label = int(rng.integers(len(SHAPE_CLASSES))) if subject_class is None else subject_class
    size = float(rng.uniform(*_SUBJECT_SIZE)) * side
    margin = 0.45 * size  # at most a sliver of the subject leaves the image
    centre = (
        float(rng.uniform(min(margin, width / 2), max(width - margin, width / 2))),
        float(rng.uniform(min(margin, height / 2), max(height - margin, height / 2))),
    )
    subject = _sample_instance(rng, label, size, centre, background)
    other_classes = [c for c in range(len(SHAPE_CLASSES)) if c != label]
    for _ in range(_LAYOUT_TRIES):
        below: list[ShapeInstance] = []
        above: list[ShapeInstance] = []
        for _ in range(int(rng.integers(max_distractors + 1))):
            distractor = _sample_instance(
                rng,
                int(rng.choice(other_classes)),
                float(rng.uniform(*_DISTRACTOR_SIZE)) * side,
                (float(rng.uniform(0, width)), float(rng.uniform(0, height))),
                background,
                others=[i.colour for i in (subject, *below, *above)],
            )
            (above if rng.random() < 0.5 else below).append(distractor)
        scene = Scene(width, height, background, (*below, subject, *above), subject_index=len(below))
        visible, full = _visible_areas(scene)
        others = np.delete(visible, scene.subject_index)
        subject_visible = visible[scene.subject_index]
        if (
            subject_visible >= _SUBJECT_MIN_VISIBLE * full[scene.subject_index]
            and np.all(subject_visible >= _SUBJECT_AREA_RATIO * others)
            and np.all(np.delete(_well_visible(visible, full), scene.subject_index))
        ):
            return scene
    return Scene(width, height, background, (subject,), subject_index=0)


def _multi_scene(
    rng: np.random.Generator, width: int, height: int, background: Background, max_instances: int
) -> Scene:
    """1..max_instances overlapping shapes of any class; instances left mostly hidden are dropped
    (dropping one only uncovers those below it, so the survivors stay visible enough)."""
    side = min(width, height)
    instances: list[ShapeInstance] = []
    for _ in range(int(rng.integers(1, max_instances + 1))):
        instances.append(
            _sample_instance(
                rng,
                int(rng.integers(len(SHAPE_CLASSES))),
                float(rng.uniform(*_SCENE_SIZE)) * side,
                (float(rng.uniform(0, width)), float(rng.uniform(0, height))),
                background,
                others=[i.colour for i in instances],
            )
        )
    scene = Scene(width, height, background, tuple(instances))
    keep = _well_visible(*_visible_areas(scene))
    keep[-1] |= not keep.any()  # the topmost shape is never occluded: keep it if nothing else survives
    return Scene(width, height, background, tuple(i for i, k in zip(instances, keep, strict=True) if k))


def sample_scene(
    rng: np.random.Generator,
    width: int,
    height: int,
    *,
    dominant: bool,
    subject_class: int | None = None,
    max_distractors: int = 2,
    max_instances: int = 6,
) -> Scene:
    """Random scene on a flat, gradient or noise background.

    `dominant=True` (classification): one large subject of `subject_class` (random if None) covering
    45-85% of the shorter side, that stays the largest visible shape and at least 70% visible, plus up to
    `max_distractors` small shapes of other classes. `dominant=False` (detection/segmentation): 1 to
    `max_instances` shapes of random classes and sizes that may overlap, each at least 30% visible."""
    if width < 8 or height < 8:
        raise ValueError(f"scenes need at least 8x8 pixels, got {width}x{height}")
    if subject_class is not None and not 0 <= subject_class < len(SHAPE_CLASSES):
        raise ValueError(f"subject_class must be in [0, {len(SHAPE_CLASSES)}), got {subject_class}")
    background = _sample_background(rng)
    if dominant:
        return _dominant_scene(rng, width, height, background, subject_class, max_distractors)
    if subject_class is not None:
        raise ValueError("subject_class only applies to dominant scenes")
    return _multi_scene(rng, width, height, background, max_instances)


# ------------------------------------------------------------------------------------- ImageNet layout


def imagenet_scene(seed: int, split: str, class_index: int, index: int, image_size: int) -> Scene:
    """The scene of image `index` of class `class_index` in `split`, independent of every other image."""
    sequence = np.random.SeedSequence([seed, _IMAGENET_STREAM, SPLITS.index(split), class_index, index])
    rng = np.random.default_rng(sequence)
    return sample_scene(rng, image_size, image_size, dominant=True, subject_class=class_index)


def _imagenet_manifest(
    train_per_class: int, val_per_class: int, image_size: int, seed: int, image_format: str
) -> dict[str, Any]:
    """The manifest a complete directory carries; everything in it but `counts` must match for reuse."""
    return {
        "generator": __name__,
        "version": GENERATOR_VERSION,
        "format": "imagenet",
        "classes": list(SHAPE_CLASSES),
        "args": {
            "train_per_class": int(train_per_class),
            "val_per_class": int(val_per_class),
            "image_size": int(image_size),
            "seed": int(seed),
            "image_format": image_format,
        },
        "counts": {
            "train": train_per_class * len(SHAPE_CLASSES),
            "val": val_per_class * len(SHAPE_CLASSES),
        },
    }


def _validate_args(
    train_per_class: int, val_per_class: int, image_size: int, seed: int, image_format: str
) -> None:
    for name, value, low in (
        ("train_per_class", train_per_class, 1),
        ("val_per_class", val_per_class, 1),
        ("image_size", image_size, 16),
        ("seed", seed, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if image_format not in _EXTENSIONS:
        raise ValueError(f"image_format must be one of {sorted(_EXTENSIONS)}, got {image_format!r}")


def _manifest_differences(existing: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    diffs = []
    for key in ("generator", "version", "format", "classes"):
        if existing.get(key) != expected[key]:
            diffs.append(f"{key}: existing {existing.get(key)!r}, requested {expected[key]!r}")
    existing_args = existing.get("args") if isinstance(existing.get("args"), dict) else {}
    for key, value in expected["args"].items():
        if existing_args.get(key) != value:
            diffs.append(f"{key}: existing {existing_args.get(key)!r}, requested {value!r}")
    return diffs


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and next(path.iterdir(), None) is None


def _check_existing(root: Path, expected: dict[str, Any]) -> bool:
    """True if `root` is a complete directory generated with `expected`; False if it is absent or an
    empty directory (free to generate into). Raises ValueError for anything else: never overwrite."""
    if not root.exists() or _is_empty_dir(root):
        return False
    hint = "Delete it or point data_dir elsewhere."
    manifest_path = root / MANIFEST_NAME
    if not root.is_dir() or not manifest_path.is_file():
        raise ValueError(
            f"{root} exists and is not empty but has no {MANIFEST_NAME}: it was not generated by piip; "
            f"refusing to overwrite it. {hint}"
        )
    try:
        existing = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{manifest_path} is unreadable ({error}). {hint}") from error
    if not isinstance(existing, dict):
        raise ValueError(f"{manifest_path} is not a piip synthetic-data manifest. {hint}")
    diffs = _manifest_differences(existing, expected)
    if diffs:
        raise ValueError(
            f"{root} holds synthetic data generated with different settings ({'; '.join(diffs)}). "
            f"Delete it to regenerate, or choose another data_dir."
        )
    _check_counts(root, expected)
    return True


def _check_counts(root: Path, expected: dict[str, Any]) -> None:
    """Cheap completeness check (directory listings only) so that deleted files do not go unnoticed."""
    if expected["format"] != "imagenet":
        _check_dense_counts(root, expected)
        return
    extension = _EXTENSIONS[expected["args"]["image_format"]]
    for split in SPLITS:
        wanted = expected["args"][f"{split}_per_class"]
        for name in SHAPE_CLASSES:
            folder = root / split / name
            found = sum(1 for p in folder.glob(f"*{extension}")) if folder.is_dir() else 0
            if found != wanted:
                raise ValueError(
                    f"{root} is incomplete or was modified: {folder} has {found} of {wanted} images. "
                    f"Delete {root} to regenerate it."
                )


def _write_split(
    target: Path, split: str, per_class: int, image_size: int, seed: int, image_format: str
) -> None:
    extension = _EXTENSIONS[image_format]
    options: dict[str, Any] = {"quality": 95, "subsampling": 0} if image_format == "JPEG" else {}
    for class_index, name in enumerate(SHAPE_CLASSES):
        folder = target / split / name
        folder.mkdir(parents=True)
        for index in range(per_class):
            image = render_image(imagenet_scene(seed, split, class_index, index, image_size))
            image.save(folder / f"{name}_{index:05d}{extension}", format=image_format, **options)


def write_imagenet_layout(
    root: str | os.PathLike[str],
    *,
    train_per_class: int,
    val_per_class: int,
    image_size: int,
    seed: int,
    image_format: ImageFormat = "JPEG",
) -> Path:
    """Write `root/{train,val}/<class>/<class>_<index:05d>.JPEG` plus `root/piip_synthetic.json`.

    Everything goes into a hidden sibling temp directory that is renamed to `root` only when complete
    (manifest included), so an interrupted run never leaves a `root` that looks finished. Refuses a
    non-empty `root` (FileExistsError); if another process publishes an identical `root` while this one
    generates (two DDP ranks), this one discards its copy and returns `root`."""
    _validate_args(train_per_class, val_per_class, image_size, seed, image_format)
    root = Path(root)
    expected = _imagenet_manifest(train_per_class, val_per_class, image_size, seed, image_format)

    def fill(temp: Path) -> None:
        for split in SPLITS:
            per_class = train_per_class if split == "train" else val_per_class
            _write_split(temp, split, per_class, image_size, seed, image_format)

    start = time.perf_counter()
    _write_atomically(root, expected, fill, "ensure_imagenet_layout")
    counts = expected["counts"]
    log.info(
        "Generated synthetic ImageNet-layout shapes at %s: %d train + %d val images (%d classes, %dpx) "
        "in %.1f s",
        root,
        counts["train"],
        counts["val"],
        len(SHAPE_CLASSES),
        image_size,
        time.perf_counter() - start,
    )
    return root


def _write_atomically(
    root: Path, expected: dict[str, Any], fill: Callable[[Path], None], ensure_name: str
) -> None:
    """Shared by every writer: `fill` writes the files into a hidden sibling temp directory, the manifest
    is added last and the directory is renamed to `root` (see `_publish`). Refuses a non-empty `root`
    (FileExistsError); the temp directory never outlives the call, whether it succeeds or fails."""
    if root.exists() and not _is_empty_dir(root):
        raise FileExistsError(f"{root} already exists and is not empty; {ensure_name} reuses it")
    root.parent.mkdir(parents=True, exist_ok=True)
    temp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        temp.mkdir()
        fill(temp)
        manifest = json.dumps(expected, indent=2, sort_keys=True) + "\n"
        (temp / MANIFEST_NAME).write_text(manifest)
        _publish(temp, root, expected)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _ensure(root: Path, expected: dict[str, Any], write: Callable[[], Path], what: str) -> Path:
    """Shared by every `ensure_*`: reuse a matching `root`, else generate it; a concurrent writer that
    publishes first is reused if it matches (and refused with the differences otherwise)."""
    if _check_existing(root, expected):
        log.debug("Reusing synthetic %s at %s", what, root)
        return root
    try:
        return write()
    except FileExistsError:
        # Another process published `root` between our check and our write: reuse it if it matches.
        if _check_existing(root, expected):
            return root
        raise


def _publish(temp: Path, root: Path, expected: dict[str, Any]) -> None:
    """Atomically rename the finished `temp` to `root` (allowed onto an empty directory). If a concurrent
    writer got there first, its directory must match `expected`; ours is then discarded by the caller."""
    try:
        os.replace(temp, root)
    except OSError:
        if not _check_existing(root, expected):
            raise
        log.info("%s was generated concurrently by another process; discarding this copy", root)


def ensure_imagenet_layout(
    root: str | os.PathLike[str],
    *,
    train_per_class: int,
    val_per_class: int,
    image_size: int,
    seed: int,
    image_format: ImageFormat = "JPEG",
) -> Path:
    """Return `root`, generating it first if absent (or an empty directory).

    A `root` generated earlier with the same arguments is reused as is (only the manifest and directory
    listings are read). A `root` from other arguments, or one not generated by piip, raises ValueError
    naming the path and what differs. Safe to call from several processes at once: each may generate, the
    first rename wins and the others discard their copy."""
    _validate_args(train_per_class, val_per_class, image_size, seed, image_format)
    root = Path(root)
    expected = _imagenet_manifest(train_per_class, val_per_class, image_size, seed, image_format)
    return _ensure(
        root,
        expected,
        lambda: write_imagenet_layout(
            root,
            train_per_class=train_per_class,
            val_per_class=val_per_class,
            image_size=image_size,
            seed=seed,
            image_format=image_format,
        ),
        "ImageNet-layout shapes",
    )


# ------------------------------------------------------------------------- dense layouts: COCO, ADE20K

_COCO_STREAM = 1
_ADE20K_STREAM = 2
# Non-contiguous like real COCO (whose ids run 1..90 with gaps), so label-mapping code is exercised.
COCO_CATEGORY_IDS: tuple[int, ...] = (1, 2, 3, 5, 8, 13, 21, 34)
assert len(COCO_CATEGORY_IDS) == len(SHAPE_CLASSES)
COCO_SPLIT_DIRS: dict[str, str] = {"train": "train2017", "val": "val2017"}
ADE20K_DIR = "ADEChallengeData2016"
ADE20K_SPLIT_DIRS: dict[str, str] = {"train": "training", "val": "validation"}
_ADE20K_PREFIXES: dict[str, str] = {"train": "ADE_train_", "val": "ADE_val_"}
_MIN_ANNOTATION_PIXELS = 4  # COCO instances with a smaller visible area are left out
_JPEG_OPTIONS: dict[str, Any] = {"quality": 95, "subsampling": 0}

__all__ += [
    "ADE20K_DIR",
    "ADE20K_SPLIT_DIRS",
    "COCO_CATEGORY_IDS",
    "COCO_SPLIT_DIRS",
    "ade20k_scene",
    "coco_scene",
    "ensure_ade20k_layout",
    "ensure_coco_layout",
    "write_ade20k_layout",
    "write_coco_layout",
]


def _dense_scene(seed: int, stream: int, split: str, index: int, image_size: int) -> Scene:
    sequence = np.random.SeedSequence([seed, stream, SPLITS.index(split), index])
    return sample_scene(np.random.default_rng(sequence), image_size, image_size, dominant=False)


def coco_scene(seed: int, split: str, index: int, image_size: int, *, empty_every: int = 0) -> Scene:
    """The multi-object scene of COCO image `index` (0-based) in `split`. With `empty_every` > 0, every
    `empty_every`-th image (index + 1 divisible by it) keeps only its background."""
    scene = _dense_scene(seed, _COCO_STREAM, split, index, image_size)
    if empty_every > 0 and (index + 1) % empty_every == 0:
        return Scene(scene.width, scene.height, scene.background)
    return scene


def ade20k_scene(seed: int, split: str, index: int, image_size: int) -> Scene:
    """The multi-object scene of ADE20K-layout image `index` (0-based) in `split`."""
    return _dense_scene(seed, _ADE20K_STREAM, split, index, image_size)


def _validate_dense_args(**values: Any) -> None:
    lows = {
        "train_images": 1,
        "val_images": 1,
        "image_size": 16,
        "seed": 0,
        "crowd_every": 0,
        "empty_every": 0,
    }
    for name, value in values.items():
        low = lows[name]
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _dense_manifest(format_name: str, **args: int) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "generator": __name__,
        "version": GENERATOR_VERSION,
        "format": format_name,
        "classes": list(SHAPE_CLASSES),
        "args": {key: int(value) for key, value in args.items()},
        "counts": {"train": int(args["train_images"]), "val": int(args["val_images"])},
    }
    if format_name == "coco":
        manifest["category_ids"] = list(COCO_CATEGORY_IDS)
    else:
        manifest["labels"] = ["other", *SHAPE_CLASSES]  # label value -> name; 0 is ignored in training
    return manifest


def _dense_listing(expected: dict[str, Any]) -> list[tuple[Path, str, int]]:
    """(folder relative to root, glob pattern, expected file count) of a complete dense layout."""
    counts = expected["counts"]
    if expected["format"] == "coco":
        listing = [(Path(COCO_SPLIT_DIRS[s]), "*.jpg", counts[s]) for s in SPLITS]
        return listing + [(Path("annotations"), "instances_*2017.json", len(SPLITS))]
    listing = []
    for split in SPLITS:
        listing.append((Path(ADE20K_DIR, "images", ADE20K_SPLIT_DIRS[split]), "*.jpg", counts[split]))
        listing.append((Path(ADE20K_DIR, "annotations", ADE20K_SPLIT_DIRS[split]), "*.png", counts[split]))
    return listing


# Listings of formats written by other modules (e.g. "llava" by piip.data.synthetic.llava), by format name.
EXTRA_LISTINGS: dict[str, Callable[[dict[str, Any]], list[tuple[Path, str, int]]]] = {}


def _check_dense_counts(root: Path, expected: dict[str, Any]) -> None:
    listing = EXTRA_LISTINGS.get(expected["format"], _dense_listing)
    for relative, pattern, wanted in listing(expected):
        folder = root / relative
        found = sum(1 for _ in folder.glob(pattern)) if folder.is_dir() else 0
        if found != wanted:
            raise ValueError(
                f"{root} is incomplete or was modified: {folder} has {found} of {wanted} {pattern} files. "
                f"Delete {root} to regenerate it."
            )


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO uncompressed RLE: alternating run lengths of 0s and 1s in column-major order, 0s first."""
    flat = mask.ravel(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"counts": rle["counts"].decode("ascii"), "size": [int(v) for v in rle["size"]]}


def _boundary_loops(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """Closed loops of pixel edges around `mask` (vertices at integer pixel-corner coordinates, corners
    only), each oriented clockwise on screen (y down) for an outer boundary and the other way for a hole."""
    padded = np.pad(mask.astype(bool), 1)
    inside = padded[1:-1, 1:-1]
    successors: dict[tuple[int, int], list[tuple[int, int]]] = {}
    # Per boundary side of an inside pixel (x, y): the directed edge with the pixel on its right.
    sides = (
        (~padded[:-2, 1:-1], (0, 0), (1, 0)),  # outside above: top edge, left to right
        (~padded[1:-1, 2:], (1, 0), (1, 1)),  # outside right: right edge, downwards
        (~padded[2:, 1:-1], (1, 1), (0, 1)),  # outside below: bottom edge, right to left
        (~padded[1:-1, :-2], (0, 1), (0, 0)),  # outside left: left edge, upwards
    )
    for outside, (sx, sy), (ex, ey) in sides:
        for y, x in zip(*np.nonzero(inside & outside), strict=True):
            successors.setdefault((int(x) + sx, int(y) + sy), []).append((int(x) + ex, int(y) + ey))
    loops = []
    while successors:
        start = next(iter(successors))
        loop, vertex = [start], start
        while True:
            following = successors[vertex]
            nxt = following.pop()
            if not following:
                del successors[vertex]
            if nxt == start:
                break
            loop.append(nxt)
            vertex = nxt
        # Keep corners only: drop vertices where the direction does not change.
        corners = [
            v
            for i, v in enumerate(loop)
            if (v[0] - loop[i - 1][0], v[1] - loop[i - 1][1])
            != (loop[(i + 1) % len(loop)][0] - v[0], loop[(i + 1) % len(loop)][1] - v[1])
        ]
        loops.append(corners)
    return loops


def _mask_polygons(mask: np.ndarray) -> list[list[float]] | None:
    """COCO polygons (one flat [x1, y1, x2, y2, ...] list per outer boundary, pixel-edge coordinates) that
    pycocotools rasterises back to exactly `mask`, or None where polygons cannot (holes, e.g. a ring or a
    shape enclosed by another; COCO unions its polygons, so a hole would be filled)."""
    from pycocotools import mask as mask_utils

    polygons = []
    for loop in _boundary_loops(mask):
        if len(loop) < 3:
            return None
        xs, ys = np.asarray(loop, dtype=float).T
        signed_area = 0.5 * float(np.dot(xs, np.roll(ys, -1)) - np.dot(np.roll(xs, -1), ys))
        if signed_area <= 0:  # counter-clockwise on screen: a hole
            return None
        polygons.append([float(v) for point in loop for v in point])
    if not polygons:
        return None
    height, width = mask.shape
    decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, height, width)))
    return polygons if np.array_equal(decoded.astype(bool), mask) else None


def _coco_annotations(
    scene: Scene, image_id: int, first_id: int, crowd_every: int
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Annotations of one scene with ids from `first_id`, and how often each segmentation encoding was used.

    Encodings, all exact (they decode to the visible mask): `iscrowd=1` (every `crowd_every`-th annotation
    id) -> compressed RLE string; a visible mask without holes -> polygons traced along its pixel edges
    (one per connected piece); a mask with holes (rings, enclosed shapes) -> uncompressed RLE.
    `bbox` and `area` come from the visible mask."""
    annotations: list[dict[str, Any]] = []
    encodings: Counter[str] = Counter()
    for instance, mask in zip(scene.instances, render_instance_masks(scene), strict=True):
        area = int(mask.sum())
        if area < _MIN_ANNOTATION_PIXELS:
            continue
        annotation_id = first_id + len(annotations)
        crowd = crowd_every > 0 and annotation_id % crowd_every == 0
        polygon = None if crowd else _mask_polygons(mask)
        if crowd:
            segmentation: Any = _compressed_rle(mask)
            encodings["rle"] += 1
        elif polygon is not None:
            segmentation = polygon
            encodings["polygon"] += 1
        else:
            segmentation = _uncompressed_rle(mask)
            encodings["uncompressed_rle"] += 1
        x0, y0, x1, y1 = (int(v) for v in instance_boxes([mask])[0])
        annotations.append(
            {
                "id": annotation_id,
                "image_id": image_id,
                "category_id": COCO_CATEGORY_IDS[instance.class_index],
                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                "area": float(area),
                "iscrowd": int(crowd),
                "segmentation": segmentation,
            }
        )
    return annotations, encodings


def _write_coco_split(
    temp: Path, split: str, count: int, image_size: int, seed: int, crowd_every: int, empty_every: int
) -> Counter[str]:
    folder = temp / COCO_SPLIT_DIRS[split]
    folder.mkdir(parents=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    encodings: Counter[str] = Counter()
    for index in range(count):
        image_id = index + 1
        scene = coco_scene(seed, split, index, image_size, empty_every=empty_every)
        file_name = f"{image_id:012d}.jpg"
        render_image(scene).save(folder / file_name, format="JPEG", **_JPEG_OPTIONS)
        images.append({"id": image_id, "file_name": file_name, "width": scene.width, "height": scene.height})
        new, used = _coco_annotations(scene, image_id, len(annotations) + 1, crowd_every)
        annotations += new
        encodings += used
    document = {
        "info": {"description": "piip synthetic shapes", "version": str(GENERATOR_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": category_id, "name": name, "supercategory": "shape"}
            for category_id, name in zip(COCO_CATEGORY_IDS, SHAPE_CLASSES, strict=True)
        ],
    }
    annotation_dir = temp / "annotations"
    annotation_dir.mkdir(exist_ok=True)
    text = json.dumps(document, separators=(",", ":"))
    (annotation_dir / f"instances_{COCO_SPLIT_DIRS[split]}.json").write_text(text)
    return encodings


def write_coco_layout(
    root: str | os.PathLike[str],
    *,
    train_images: int,
    val_images: int,
    image_size: int,
    seed: int,
    crowd_every: int = 10,
    empty_every: int = 8,
) -> Path:
    """Write a COCO 2017 layout of multi-object scenes: `root/{train2017,val2017}/<id:012d>.jpg`,
    `root/annotations/instances_{train2017,val2017}.json` and `root/piip_synthetic.json`.

    Category ids are `COCO_CATEGORY_IDS` (non-contiguous), names `SHAPE_CLASSES`. Every `empty_every`-th
    image has no objects and every `crowd_every`-th annotation is a crowd (0 disables either); see
    `_coco_annotations` for the segmentation encodings. Atomic and refusing like `write_imagenet_layout`."""
    args = {
        "train_images": train_images,
        "val_images": val_images,
        "image_size": image_size,
        "seed": seed,
        "crowd_every": crowd_every,
        "empty_every": empty_every,
    }
    _validate_dense_args(**args)
    root = Path(root)
    expected = _dense_manifest("coco", **args)
    encodings: Counter[str] = Counter()

    def fill(temp: Path) -> None:
        nonlocal encodings
        for split in SPLITS:
            count = train_images if split == "train" else val_images
            encodings += _write_coco_split(temp, split, count, image_size, seed, crowd_every, empty_every)

    start = time.perf_counter()
    _write_atomically(root, expected, fill, "ensure_coco_layout")
    log.info(
        "Generated synthetic COCO-layout shapes at %s: %d train + %d val images (%dpx; segmentations: %s) "
        "in %.1f s",
        root,
        train_images,
        val_images,
        image_size,
        ", ".join(f"{n} {k}" for k, n in sorted(encodings.items())) or "none",
        time.perf_counter() - start,
    )
    return root


def ensure_coco_layout(
    root: str | os.PathLike[str],
    *,
    train_images: int,
    val_images: int,
    image_size: int,
    seed: int,
    crowd_every: int = 10,
    empty_every: int = 8,
) -> Path:
    """`write_coco_layout` unless `root` already holds it; reuse and refusal as `ensure_imagenet_layout`."""
    args = {
        "train_images": train_images,
        "val_images": val_images,
        "image_size": image_size,
        "seed": seed,
        "crowd_every": crowd_every,
        "empty_every": empty_every,
    }
    _validate_dense_args(**args)
    root = Path(root)
    return _ensure(
        root, _dense_manifest("coco", **args), lambda: write_coco_layout(root, **args), "COCO-layout shapes"
    )


def _write_ade20k_split(temp: Path, split: str, count: int, image_size: int, seed: int) -> None:
    image_dir = temp / ADE20K_DIR / "images" / ADE20K_SPLIT_DIRS[split]
    label_dir = temp / ADE20K_DIR / "annotations" / ADE20K_SPLIT_DIRS[split]
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    for index in range(count):
        scene = ade20k_scene(seed, split, index, image_size)
        stem = f"{_ADE20K_PREFIXES[split]}{index + 1:08d}"
        render_image(scene).save(image_dir / f"{stem}.jpg", format="JPEG", **_JPEG_OPTIONS)
        Image.fromarray(render_semantic(scene), mode="L").save(label_dir / f"{stem}.png", format="PNG")


def write_ade20k_layout(
    root: str | os.PathLike[str], *, train_images: int, val_images: int, image_size: int, seed: int
) -> Path:
    """Write an ADE20K (SceneParsing) layout of multi-object scenes: `root/ADEChallengeData2016/images/
    {training,validation}/ADE_{train,val}_<n:08d>.jpg` (n from 1), same-stem single-channel uint8 PNG label
    maps under `annotations/` (0 = other/background, ignored by reduce-zero-label; `class_index + 1` for
    shapes, i.e. `render_semantic`), and `root/piip_synthetic.json`. Atomic and refusing like
    `write_imagenet_layout`."""
    args = {"train_images": train_images, "val_images": val_images, "image_size": image_size, "seed": seed}
    _validate_dense_args(**args)
    root = Path(root)
    expected = _dense_manifest("ade20k", **args)

    def fill(temp: Path) -> None:
        for split in SPLITS:
            _write_ade20k_split(
                temp, split, train_images if split == "train" else val_images, image_size, seed
            )

    start = time.perf_counter()
    _write_atomically(root, expected, fill, "ensure_ade20k_layout")
    log.info(
        "Generated synthetic ADE20K-layout shapes at %s: %d train + %d val images (%dpx) in %.1f s",
        root,
        train_images,
        val_images,
        image_size,
        time.perf_counter() - start,
    )
    return root


def ensure_ade20k_layout(
    root: str | os.PathLike[str], *, train_images: int, val_images: int, image_size: int, seed: int
) -> Path:
    """`write_ade20k_layout` unless `root` already holds it; reuse and refusal as `ensure_imagenet_layout`."""
    args = {"train_images": train_images, "val_images": val_images, "image_size": image_size, "seed": seed}
    _validate_dense_args(**args)
    root = Path(root)
    return _ensure(
        root,
        _dense_manifest("ade20k", **args),
        lambda: write_ade20k_layout(root, **args),
        "ADE20K-layout shapes",
    )
