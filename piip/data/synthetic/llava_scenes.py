"""The scenes of the LLaVA layout and the facts its questions are about, read off their visible masks.

Scenes are the multi-object scenes of `sampling.sample_scene` (1-4 shapes, `dominant=False`) with every
shape recoloured from the named `PALETTE`, so "what colour" has a one-word answer. `SceneFacts` holds what
`llava_questions` asks about (classes, colour names, visible areas, boxes and positions), so every
question is answerable from the pixels.

Determinism: each image draws its scene, its questions and (train) their prompt forms from Generators
seeded with `SeedSequence([seed, stream, split, index, purpose])` (`llava_rng`), so files are
byte-identical for the same arguments; the forms have their own purpose, so the questions asked do not
depend on them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from piip.data.synthetic.render import instance_boxes, render_instance_masks
from piip.data.synthetic.sampling import SEED_STREAMS, colour_contrast, sample_scene
from piip.data.synthetic.scene import SHAPE_CLASSES, SPLITS, Scene, ShapeInstance

__all__ = ["PALETTE", "SceneFacts", "llava_rng", "llava_scene", "scene_facts"]

# Named shape colours, pairwise at least 70 apart in RGB (the minimum `sampling.colour_contrast` asks).
PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 25),
    "blue": (45, 85, 215),
    "green": (50, 170, 70),
    "orange": (245, 145, 30),
    "purple": (135, 60, 185),
    "red": (215, 40, 40),
    "white": (245, 245, 245),
    "yellow": (240, 225, 50),
}
_COLOUR_NAMES = {rgb: name for name, rgb in PALETTE.items()}
_PURPOSES = {"scene": 0, "finetune": 1, "textvqa": 2, "mmbench": 3, "format": 4}
_MAX_INSTANCES = 4
_SCENE_TRIES = 10
_MIN_INSTANCE_PIXELS = 12  # every shape of a scene shows at least this many pixels (else resampled)
_CENTRE_RADIUS = 0.12  # position "centre": box centre within this (fraction of the side) of the middle
_SIDE_RADIUS = 0.22  # left/right/top/bottom: at least this far out ...
_SIDE_MARGIN = 0.12  # ... and this much further along its axis than along the other one
_LARGEST_RATIO = 1.5  # "largest" is asked when its area is this many times any other class's


@dataclass(frozen=True)
class SceneFacts:
    """What the questions are about, per instance in paint order (visible masks, so occlusion counts)."""

    classes: tuple[str, ...]
    colours: tuple[str, ...]  # PALETTE names
    areas: tuple[int, ...]  # visible pixels
    boxes: tuple[tuple[int, int, int, int], ...]  # visible boxes x0, y0, x1, y1 (exclusive ends)
    positions: tuple[str | None, ...]  # left/right/top/bottom/centre, None where ambiguous
    width: int
    height: int

    @property
    def count(self) -> int:
        return len(self.classes)

    def once(self) -> list[str]:
        """Classes present exactly once, in class order."""
        counts = Counter(self.classes)
        return [name for name in SHAPE_CLASSES if counts[name] == 1]

    def largest(self) -> str | None:
        """Class of the largest visible shape if it is clearly larger than every shape of another class."""
        if len(set(self.classes)) < 2:
            return None
        best = int(np.argmax(self.areas))
        rivals = [a for a, c in zip(self.areas, self.classes, strict=True) if c != self.classes[best]]
        return self.classes[best] if self.areas[best] >= _LARGEST_RATIO * max(rivals) else None

    def left_to_right(self) -> list[int]:
        """Instance indices ordered by visible box centre x (then y, then paint order)."""
        keys = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2, i) for i, b in enumerate(self.boxes)]
        return [i for _, _, i in sorted(keys)]


def _position(box: Sequence[int], width: int, height: int) -> str | None:
    """Region of the box centre, or None where it lies between regions (near a diagonal or a border)."""
    dx = (box[0] + box[2]) / 2 / width - 0.5
    dy = (box[1] + box[3]) / 2 / height - 0.5
    reach = max(abs(dx), abs(dy))
    if reach <= _CENTRE_RADIUS:
        return "centre"
    if reach < _SIDE_RADIUS:
        return None
    if abs(dx) >= abs(dy) + _SIDE_MARGIN:
        return "left" if dx < 0 else "right"
    if abs(dy) >= abs(dx) + _SIDE_MARGIN:
        return "top" if dy < 0 else "bottom"
    return None


def scene_facts(scene: Scene, masks: Sequence[np.ndarray] | None = None) -> SceneFacts:
    """Facts of a scene with palette colours (`llava_scene`); pass `masks` to avoid rasterising twice."""
    if masks is None:
        masks = render_instance_masks(scene)
    boxes = tuple((int(x0), int(y0), int(x1), int(y1)) for x0, y0, x1, y1 in instance_boxes(masks))
    return SceneFacts(
        classes=tuple(i.class_name for i in scene.instances),
        colours=tuple(_COLOUR_NAMES[i.colour] for i in scene.instances),
        areas=tuple(int(m.sum()) for m in masks),
        boxes=boxes,
        positions=tuple(_position(b, scene.width, scene.height) for b in boxes),
        width=scene.width,
        height=scene.height,
    )


def llava_rng(seed: int, split_code: int, index: int, purpose: str) -> np.random.Generator:
    """The Generator of image `index` of split `split_code` (`SPLITS` index) for `purpose`."""
    sequence = np.random.SeedSequence([seed, SEED_STREAMS["llava"], split_code, index, _PURPOSES[purpose]])
    return np.random.default_rng(sequence)


def _palette_colour(
    rng: np.random.Generator, scene: Scene, others: Sequence[tuple[int, int, int]]
) -> tuple[int, int, int]:
    """A palette colour contrasting with the background and the shapes coloured so far (uniform among those
    that pass `sampling.colour_contrast`; the best one when none does)."""
    scores = {name: colour_contrast(rgb, scene.background, others) for name, rgb in PALETTE.items()}
    passing = [name for name, score in scores.items() if score >= 1.0]
    if passing:
        return PALETTE[passing[int(rng.integers(len(passing)))]]
    return PALETTE[max(scores, key=lambda name: scores[name])]


def llava_scene(seed: int, split: str, index: int, image_size: int) -> Scene:
    """The scene of image `index` (0-based) of `split`: a multi-object scene of 1-4 shapes recoloured from
    `PALETTE`, resampled until every shape shows at least `_MIN_INSTANCE_PIXELS` pixels."""
    rng = llava_rng(seed, SPLITS.index(split), index, "scene")
    scene = None
    for _ in range(_SCENE_TRIES):
        scene = sample_scene(rng, image_size, image_size, dominant=False, max_instances=_MAX_INSTANCES)
        if all(m.sum() >= _MIN_INSTANCE_PIXELS for m in render_instance_masks(scene)):
            break
    assert scene is not None
    instances: list[ShapeInstance] = []
    for instance in scene.instances:
        colour = _palette_colour(rng, scene, [i.colour for i in instances])
        instances.append(
            ShapeInstance(
                instance.class_index,
                instance.centre,
                instance.size,
                instance.rotation,
                colour,
                instance.aspect,
            )
        )
    return Scene(scene.width, scene.height, scene.background, tuple(instances))
