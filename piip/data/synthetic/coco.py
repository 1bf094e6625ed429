"""The COCO 2017 instances layout of the shapes data, with exact segmentations in all three encodings.

`root/{train2017,val2017}/<id:012d>.jpg` and `root/annotations/instances_{train2017,val2017}.json`, read
by `piip.data.coco`. Segmentations use every encoding COCO files contain (polygons, uncompressed RLE for
masks with holes, compressed RLE for crowds) and each decodes to exactly the visible mask, so the loading
code is exercised on all of them. Published and reused through `publish`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from piip.data.synthetic.dense_layouts import dense_manifest, dense_scene, validate_dense_args
from piip.data.synthetic.publish import check_listing, ensure_layout, write_atomically
from piip.data.synthetic.render import JPEG_OPTIONS, instance_boxes, render_image, render_instance_masks
from piip.data.synthetic.sampling import SEED_STREAMS
from piip.data.synthetic.scene import GENERATOR_VERSION, SHAPE_CLASSES, SPLITS, Scene

__all__ = ["COCO_CATEGORY_IDS", "COCO_SPLIT_DIRS", "coco_scene", "ensure_coco_layout", "write_coco_layout"]

log = logging.getLogger(__name__)

# Non-contiguous like real COCO (whose ids run 1..90 with gaps), so label-mapping code is exercised.
COCO_CATEGORY_IDS: tuple[int, ...] = (1, 2, 3, 5, 8, 13, 21, 34)
assert len(COCO_CATEGORY_IDS) == len(SHAPE_CLASSES)
COCO_SPLIT_DIRS: dict[str, str] = {"train": "train2017", "val": "val2017"}
_MIN_ANNOTATION_PIXELS = 4  # COCO instances with a smaller visible area are left out


def coco_scene(seed: int, split: str, index: int, image_size: int, *, empty_every: int = 0) -> Scene:
    """The multi-object scene of COCO image `index` (0-based) in `split`. With `empty_every` > 0, every
    `empty_every`-th image (index + 1 divisible by it) keeps only its background."""
    scene = dense_scene(seed, SEED_STREAMS["coco"], split, index, image_size)
    if empty_every > 0 and (index + 1) % empty_every == 0:
        return Scene(scene.width, scene.height, scene.background)
    return scene


def _manifest(**args: int) -> dict[str, Any]:
    manifest = dense_manifest("coco", **args)
    manifest["category_ids"] = list(COCO_CATEGORY_IDS)
    return manifest


def _check_files(root: Path, expected: dict[str, Any]) -> None:
    """Cheap completeness check (directory listings only): the images of each split and both json files."""
    counts = expected["counts"]
    listing = [(Path(COCO_SPLIT_DIRS[s]), "*.jpg", counts[s]) for s in SPLITS]
    check_listing(root, listing + [(Path("annotations"), "instances_*2017.json", len(SPLITS))])


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
        render_image(scene).save(folder / file_name, format="JPEG", **JPEG_OPTIONS)
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
    validate_dense_args(**args)
    root = Path(root)
    expected = _manifest(**args)
    encodings: Counter[str] = Counter()

    def fill(temp: Path) -> None:
        nonlocal encodings
        for split in SPLITS:
            count = train_images if split == "train" else val_images
            encodings += _write_coco_split(temp, split, count, image_size, seed, crowd_every, empty_every)

    start = time.perf_counter()
    write_atomically(root, expected, fill, "ensure_coco_layout", _check_files)
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
    validate_dense_args(**args)
    root = Path(root)
    write = lambda: write_coco_layout(root, **args)
    return ensure_layout(root, _manifest(**args), write, "COCO-layout shapes", _check_files)
