"""Seeded sampling of scenes: backgrounds, contrasting shape colours and instance layouts.

`sample_scene` draws one `Scene` from a numpy Generator, either a dominant scene (one large subject for
classification) or a multi-object scene (detection, segmentation, LLaVA). Layouts are checked by rendering
their masks (`render.visible_areas`), so every object shows enough of itself to be annotated.

Determinism: each format seeds one Generator per image from `SeedSequence([seed, stream, split, ...])`,
with `stream` from `SEED_STREAMS`, so the same arguments give byte-identical files, any single image can
be regenerated alone and no two formats share a random stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from piip.data.synthetic.render import visible_areas
from piip.data.synthetic.scene import RGB, SHAPE_CLASSES, Background, Scene, ShapeInstance

__all__ = ["SEED_STREAMS", "colour_contrast", "sample_scene"]

# The SeedSequence key after the seed, per format: each format draws from its own random streams.
SEED_STREAMS: dict[str, int] = {"imagenet": 0, "coco": 1, "ade20k": 2, "llava": 3}
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


def colour_contrast(colour: RGB, background: Background, others: Sequence[RGB]) -> float:
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
        score = colour_contrast(colour, background, others)
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
        visible, full = visible_areas(scene)
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
    keep = _well_visible(*visible_areas(scene))
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
