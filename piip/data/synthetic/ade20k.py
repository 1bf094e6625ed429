"""The ADE20K (SceneParsing) layout of the shapes data: images with single-channel semantic label maps.

`root/ADEChallengeData2016/{images,annotations}/{training,validation}/ADE_{train,val}_<n:08d>.{jpg,png}`,
read by `piip.data.ade20k`. Label value 0 is "other" (the background, ignored by reduce-zero-label) and
`class_index + 1` a shape (`render.render_semantic`). Published and reused through `publish`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from PIL import Image

from piip.data.synthetic.dense_layouts import dense_manifest, dense_scene, validate_dense_args
from piip.data.synthetic.publish import check_listing, ensure_layout, write_atomically
from piip.data.synthetic.render import JPEG_OPTIONS, render_image, render_semantic
from piip.data.synthetic.sampling import SEED_STREAMS
from piip.data.synthetic.scene import SHAPE_CLASSES, SPLITS, Scene

__all__ = ["ADE20K_DIR", "ADE20K_SPLIT_DIRS", "ade20k_scene", "ensure_ade20k_layout", "write_ade20k_layout"]

log = logging.getLogger(__name__)

ADE20K_DIR = "ADEChallengeData2016"
ADE20K_SPLIT_DIRS: dict[str, str] = {"train": "training", "val": "validation"}
_ADE20K_PREFIXES: dict[str, str] = {"train": "ADE_train_", "val": "ADE_val_"}


def ade20k_scene(seed: int, split: str, index: int, image_size: int) -> Scene:
    """The multi-object scene of ADE20K-layout image `index` (0-based) in `split`."""
    return dense_scene(seed, SEED_STREAMS["ade20k"], split, index, image_size)


def _manifest(**args: int) -> dict[str, Any]:
    manifest = dense_manifest("ade20k", **args)
    manifest["labels"] = ["other", *SHAPE_CLASSES]  # label value -> name; 0 is ignored in training
    return manifest


def _check_files(root: Path, expected: dict[str, Any]) -> None:
    """Cheap completeness check (directory listings only): the images and label maps of each split."""
    counts = expected["counts"]
    listing = []
    for split in SPLITS:
        listing.append((Path(ADE20K_DIR, "images", ADE20K_SPLIT_DIRS[split]), "*.jpg", counts[split]))
        listing.append((Path(ADE20K_DIR, "annotations", ADE20K_SPLIT_DIRS[split]), "*.png", counts[split]))
    check_listing(root, listing)


def _write_ade20k_split(temp: Path, split: str, count: int, image_size: int, seed: int) -> None:
    image_dir = temp / ADE20K_DIR / "images" / ADE20K_SPLIT_DIRS[split]
    label_dir = temp / ADE20K_DIR / "annotations" / ADE20K_SPLIT_DIRS[split]
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    for index in range(count):
        scene = ade20k_scene(seed, split, index, image_size)
        stem = f"{_ADE20K_PREFIXES[split]}{index + 1:08d}"
        render_image(scene).save(image_dir / f"{stem}.jpg", format="JPEG", **JPEG_OPTIONS)
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
    validate_dense_args(**args)
    root = Path(root)
    expected = _manifest(**args)

    def fill(temp: Path) -> None:
        for split in SPLITS:
            _write_ade20k_split(
                temp, split, train_images if split == "train" else val_images, image_size, seed
            )

    start = time.perf_counter()
    write_atomically(root, expected, fill, "ensure_ade20k_layout", _check_files)
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
    validate_dense_args(**args)
    root = Path(root)
    write = lambda: write_ade20k_layout(root, **args)
    return ensure_layout(root, _manifest(**args), write, "ADE20K-layout shapes", _check_files)
