"""What the multi-object ("dense") layouts share: their seeded scenes, argument checks and manifest.

COCO (`coco`) and ADE20K (`ade20k`) images are multi-object scenes drawn the same way from their own
random stream, take the same image-count arguments and carry manifests of the same shape; LLaVA (`llava`)
checks its image-count arguments with the same rules.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from piip.data.synthetic.sampling import sample_scene
from piip.data.synthetic.scene import GENERATOR_ID, GENERATOR_VERSION, SHAPE_CLASSES, SPLITS, Scene

__all__ = ["dense_manifest", "dense_scene", "validate_dense_args"]

# Smallest allowed value per argument of the dense writers.
_LOWEST: dict[str, int] = {
    "train_images": 1,
    "val_images": 1,
    "image_size": 16,
    "seed": 0,
    "crowd_every": 0,
    "empty_every": 0,
}


def dense_scene(seed: int, stream: int, split: str, index: int, image_size: int) -> Scene:
    """The multi-object scene of image `index` of `split` in the random stream `stream` (`SEED_STREAMS`)."""
    sequence = np.random.SeedSequence([seed, stream, SPLITS.index(split), index])
    return sample_scene(np.random.default_rng(sequence), image_size, image_size, dominant=False)


def validate_dense_args(**values: Any) -> None:
    """Raise ValueError unless every argument is an integer at least its lowest allowed value."""
    for name, value in values.items():
        low = _LOWEST[name]
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def dense_manifest(format_name: str, **args: int) -> dict[str, Any]:
    """The manifest fields every dense layout carries; the writers add their format's own fields."""
    return {
        "generator": GENERATOR_ID,
        "version": GENERATOR_VERSION,
        "format": format_name,
        "classes": list(SHAPE_CLASSES),
        "args": {key: int(value) for key, value in args.items()},
        "counts": {"train": int(args["train_images"]), "val": int(args["val_images"])},
    }
