"""The ImageNet folder layout of the shapes data: one dominant shape per image, one folder per class.

`root/{train,val}/<class>/<class>_<index:05d>.JPEG`, read by `torchvision.datasets.ImageFolder` in
`piip.data.imagenet`; class folders carry the names of `SHAPE_CLASSES`, so folder index == class index.
Published and reused through `publish`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from piip.data.synthetic.publish import ensure_layout, write_atomically
from piip.data.synthetic.render import JPEG_OPTIONS, render_image
from piip.data.synthetic.sampling import SEED_STREAMS, sample_scene
from piip.data.synthetic.scene import GENERATOR_ID, GENERATOR_VERSION, SHAPE_CLASSES, SPLITS, Scene

__all__ = ["ImageFormat", "ensure_imagenet_layout", "imagenet_scene", "write_imagenet_layout"]

log = logging.getLogger(__name__)

ImageFormat = Literal["JPEG", "PNG"]

_EXTENSIONS: dict[str, str] = {"JPEG": ".JPEG", "PNG": ".png"}


def imagenet_scene(seed: int, split: str, class_index: int, index: int, image_size: int) -> Scene:
    """The scene of image `index` of class `class_index` in `split`, independent of every other image."""
    sequence = np.random.SeedSequence(
        [seed, SEED_STREAMS["imagenet"], SPLITS.index(split), class_index, index]
    )
    rng = np.random.default_rng(sequence)
    return sample_scene(rng, image_size, image_size, dominant=True, subject_class=class_index)


def _imagenet_manifest(
    train_per_class: int, val_per_class: int, image_size: int, seed: int, image_format: str
) -> dict[str, Any]:
    """The manifest a complete directory carries; everything in it but `counts` must match for reuse."""
    return {
        "generator": GENERATOR_ID,
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


def _check_files(root: Path, expected: dict[str, Any]) -> None:
    """Cheap completeness check (directory listings only) so that deleted files do not go unnoticed."""
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
    options: dict[str, Any] = JPEG_OPTIONS if image_format == "JPEG" else {}
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
    write_atomically(root, expected, fill, "ensure_imagenet_layout", _check_files)
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
    return ensure_layout(
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
        _check_files,
    )
