"""The ImageNet folder layout (`root/train/<class>/*.JPEG`, `root/val/<class>/*.JPEG`) as a DataModule.

Unreadable or corrupt images stop the run with an error naming the file (rather than being skipped):
a silently shrinking dataset changes results without anyone noticing. Remove or replace the file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from timm.data import create_transform
from torchvision.datasets import ImageFolder
from torchvision.transforms.functional import pil_to_tensor

from piip.data.base import ResumableDataModule, load_rgb
from piip.data.sampling import SeededTransform
from piip.errors import DataError

log = logging.getLogger(__name__)


def image_folder(split_dir: Path) -> ImageFolder:
    """torchvision's `ImageFolder` with errors that name the folder and the expected layout."""
    if not split_dir.is_dir():
        raise DataError(
            f"dataset split not found: {split_dir} (expected the ImageNet layout "
            f"{split_dir}/<class_name>/<image>.JPEG; set task.data.root)"
        )
    class_dirs = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not class_dirs:
        raise DataError(f"{split_dir} has no class folders; expected {split_dir}/<class_name>/<image>.JPEG")
    try:
        return ImageFolder(str(split_dir), loader=load_rgb)
    except FileNotFoundError as err:  # torchvision: "Found no valid file for the classes ..."
        raise DataError(f"{split_dir}: {err}") from err


class ImageFolderDataModule(ResumableDataModule):
    """Train/val loaders with timm transforms; the input size follows the model's highest resolution.

    `train_transform` takes timm `create_transform` arguments (auto_augment, color_jitter, re_prob, scale,
    interpolation, ...); evaluation resizes by `eval_crop_pct` and centre-crops. `synthetic`, when set,
    writes the embedded "shapes" dataset to `root` on first use (arguments of `ensure_imagenet_layout`).
    """

    def __init__(
        self,
        root: str,
        input_size: int,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        seed: int = 0,
        mean: tuple[float, float, float] = (0.485, 0.456, 0.406),
        std: tuple[float, float, float] = (0.229, 0.224, 0.225),
        interpolation: str = "bicubic",
        eval_crop_pct: float = 1.0,
        train_transform: dict[str, Any] | None = None,
        synthetic: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, persistent_workers, seed)
        self.root = Path(root)
        self.input_size = input_size
        self.norm = {"mean": tuple(mean), "std": tuple(std), "interpolation": interpolation}
        self.eval_crop_pct = eval_crop_pct
        self.train_transform_args = dict(train_transform or {})
        self.synthetic = synthetic
        self.train_set: ImageFolder | None = None
        self.val_set: ImageFolder | None = None

    # -- data on disk -------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.synthetic is not None:
            from piip.data.synthetic import ensure_imagenet_layout

            ensure_imagenet_layout(self.root, **self.synthetic)

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is None:
            self.val_set = image_folder(self.root / "val")
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = image_folder(self.root / "train")
            if self.train_set.classes != self.val_set.classes:
                missing = sorted(set(self.train_set.classes) ^ set(self.val_set.classes))
                raise DataError(
                    f"{self.root}: train/ and val/ must hold the same class folders; they differ in {missing}"
                )
            if stage == "fit":
                self.check_train_size(len(self.train_set))

    @property
    def classes(self) -> list[str]:
        if self.val_set is None:
            self.setup("validate")
        return list(self.val_set.classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        """The class folder names (label order): checkpoints keep them, so predictions name classes."""
        return self.classes

    # -- transforms ---------------------------------------------------------------------------------------
    def train_transform(self):
        return create_transform(self.input_size, is_training=True, **self.norm, **self.train_transform_args)

    def eval_transform(self):
        return create_transform(
            self.input_size, is_training=False, crop_pct=self.eval_crop_pct, crop_mode="center", **self.norm
        )

    # -- datasets for the shared loaders ------------------------------------------------------------------
    def train_dataset(self) -> SeededTransform:
        self.setup("fit")
        return SeededTransform(self.train_set, self.train_transform(), self.seed)

    def val_dataset(self) -> SeededTransform:
        self.setup("validate")
        return SeededTransform(self.val_set, self.eval_transform(), self.seed, random_transform=False)

    def prediction_input(self, path: str | Path) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A user's image file through the validation transform, with the original pixels (3×H×W uint8)
        as the target, for `ClassificationTask.draw_predictions` to caption at the image's own size."""
        image = load_rgb(str(path))
        return self.eval_transform()(image), {"original": pil_to_tensor(image)}
