"""ADE20K SceneParsing (`ADEChallengeData2016/images|annotations/{training,validation}`) for UperNet.

The pipeline is mmseg's `ade20k.py` (PAPER.md §3.4): reduce-zero-label (0 "other" → 255 ignored, k → k-1),
random rescale of (4·crop, crop) by 0.5-2.0 keeping the aspect ratio, a random crop that avoids crops
dominated by one class (cat_max_ratio 0.75), horizontal flip, photometric distortion, ImageNet
normalisation, padding to crop×crop (image 0, label 255). Evaluation resizes to short side = crop (long side
at most 4·crop) and keeps the original-size label: metrics are computed at the original resolution.
Labels are checked per sample on load, so a bad file stops the run with its name instead of a device assert.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from piip.data.base import ResumableDataModule, load_rgb
from piip.data.sampling import SeededTransform
from piip.data.synthetic import MANIFEST_NAME
from piip.errors import DataError
from piip.evaluation.ade20k import IGNORE_INDEX

ADE20K_DIR = "ADEChallengeData2016"
SPLIT_DIRS = {"train": "training", "val": "validation"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_label(path: Path, num_classes: int) -> np.ndarray:
    """Raw label map (uint8, 0 = other, 1..num_classes, 255 = already ignored), checked value by value."""
    try:
        with Image.open(path) as image:
            label = np.asarray(image)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read label map {path}: {err}. Remove or replace this file.") from err
    if label.ndim != 2:
        raise DataError(f"label map {path} has shape {label.shape}; expected a single-channel (H, W) image")
    values = np.unique(label)
    bad = values[(values > num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        raise DataError(
            f"label map {path} holds values {bad.tolist()[:8]} outside [0, {num_classes}] (0 = other, "
            f"1..{num_classes} = classes, {IGNORE_INDEX} = ignore); check task.data.num_classes"
        )
    return label


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """0 ("other") → 255 (ignored), class k → k-1, 255 stays 255."""
    reduced = label.astype(np.int16) - 1
    reduced[(label == 0) | (label == IGNORE_INDEX)] = IGNORE_INDEX
    return reduced.astype(np.uint8)


class Ade20kSplit(torch.utils.data.Dataset):
    """Pairs `images/<split>/<stem>.jpg` with `annotations/<split>/<stem>.png`; yields uint8 tensors.

    Items are `(image 3×H×W uint8, label H×W uint8 reduced)`; a stem without its partner is an error.
    """

    def __init__(self, root: Path, split: str, num_classes: int) -> None:
        self.num_classes = num_classes
        image_dir = root / ADE20K_DIR / "images" / SPLIT_DIRS[split]
        label_dir = root / ADE20K_DIR / "annotations" / SPLIT_DIRS[split]
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise DataError(
                    f"ADE20K folder not found: {folder} (expected images/{SPLIT_DIRS[split]}/*.jpg and "
                    f"annotations/{SPLIT_DIRS[split]}/*.png under {root / ADE20K_DIR}; set task.data.root)"
                )
        images = {p.stem: p for p in image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
        labels = {p.stem: p for p in label_dir.iterdir() if p.suffix.lower() == ".png"}
        unlabelled = sorted(images.keys() - labels.keys())
        if unlabelled:
            raise DataError(
                f"image {images[unlabelled[0]]} has no label map {label_dir / (unlabelled[0] + '.png')} "
                f"({len(unlabelled)} images without labels in {image_dir})"
            )
        orphans = sorted(labels.keys() - images.keys())
        if orphans:
            raise DataError(
                f"label map {labels[orphans[0]]} has no image in {image_dir} "
                f"({len(orphans)} labels without images)"
            )
        if not images:
            raise DataError(f"no images in {image_dir}; expected <name>.jpg files")
        self.items = [(images[stem], labels[stem]) for stem in sorted(images)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, label_path = self.items[index]
        image = TF.pil_to_tensor(load_rgb(str(image_path)))
        label = load_label(label_path, self.num_classes)
        if label.shape != tuple(image.shape[-2:]):
            raise DataError(
                f"label map {label_path} is {label.shape[1]}×{label.shape[0]} but its image {image_path} is "
                f"{image.shape[2]}×{image.shape[1]}"
            )
        return image, torch.from_numpy(reduce_zero_label(label))


# -- transforms -------------------------------------------------------------------------------------------
def rescale_size(height: int, width: int, long_edge: float, short_edge: float) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the largest size with long side ≤ long_edge and short side ≤ short_edge."""
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_pair(
    image: torch.Tensor, label: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear for the image, nearest for the label (a `tv_tensors.Mask`)."""
    image = TF.resize(image, list(size), antialias=True)
    label = TF.resize(tv_tensors.Mask(label[None]), list(size))[0]
    return image, label.as_subclass(torch.Tensor)


def random_crop_box(height: int, width: int, crop: int) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a uniformly placed crop (the whole axis when it is shorter than `crop`)."""
    top = random.randint(0, max(height - crop, 0))
    left = random.randint(0, max(width - crop, 0))
    return top, left, min(crop, height), min(crop, width)


def dominated(label: torch.Tensor, cat_max_ratio: float) -> bool:
    """True when one class covers ≥ cat_max_ratio of the labelled pixels, or fewer than two classes show."""
    counts = torch.bincount(label[label != IGNORE_INDEX].long().flatten())
    counts = counts[counts > 0]
    return len(counts) < 2 or counts.max().item() / counts.sum().item() >= cat_max_ratio


def cat_max_crop_box(
    label: torch.Tensor, crop: int, cat_max_ratio: float, tries: int = 10
) -> tuple[int, ...]:
    """mmseg's RandomCrop: redraw up to `tries` times while the crop is dominated by one class."""
    height, width = label.shape
    box = random_crop_box(height, width, crop)
    if cat_max_ratio >= 1.0:
        return box
    for _ in range(tries):
        top, left, h, w = box
        if not dominated(label[top : top + h, left : left + w], cat_max_ratio):
            break
        box = random_crop_box(height, width, crop)
    return box


def photometric_distortion(image: torch.Tensor) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on a float 0-255 RGB image: each step applied with probability 0.5.

    Brightness ±32, contrast ×0.5-1.5 (before or after the colour steps, at random), saturation ×0.5-1.5
    and hue ±18° of OpenCV's 180-unit circle (i.e. ±0.1 turn), clipped to 0-255 after every step.
    """
    if random.randint(0, 1):
        image = (image + random.uniform(-32, 32)).clamp(0, 255)
    contrast_first = random.randint(0, 1) == 1
    if contrast_first and random.randint(0, 1):
        image = (image * random.uniform(0.5, 1.5)).clamp(0, 255)
    if random.randint(0, 1):
        image = scale_saturation(image, random.uniform(0.5, 1.5)).clamp(0, 255)
    if random.randint(0, 1):
        shift = random.randint(-18, 18) / 180
        image = (TF.adjust_hue(image / 255, shift) * 255).clamp(0, 255)
    if not contrast_first and random.randint(0, 1):
        image = (image * random.uniform(0.5, 1.5)).clamp(0, 255)
    return image


def scale_saturation(image: torch.Tensor, factor: float) -> torch.Tensor:
    """Multiply HSV saturation by `factor` (clipped to 1), keeping hue and value: c' = V - (V - c)·k."""
    value = image.max(dim=0, keepdim=True).values
    spread = value - image.min(dim=0, keepdim=True).values  # = S·V
    limit = torch.where(spread > 0, value / spread.clamp_min(1e-6), torch.full_like(spread, math.inf))
    return value - (value - image) * torch.clamp(limit, max=factor)


def normalize(image: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Float 0-255 (or uint8) image → normalised float, statistics given in the 0-1 scale."""
    return TF.normalize(image.float() / 255, list(mean), list(std))


class TrainTransform:
    """Rescale → cat-max crop → flip → photometric distortion → normalise → pad to crop×crop."""

    def __init__(
        self,
        crop: int,
        ratio_range: tuple[float, float],
        cat_max_ratio: float,
        flip: float,
        photometric: bool,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        self.crop = crop
        self.ratio_range = ratio_range
        self.cat_max_ratio = cat_max_ratio
        self.flip = flip
        self.photometric = photometric
        self.mean, self.std = mean, std

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ratio = random.uniform(*self.ratio_range)
        size = rescale_size(*label.shape, 4 * self.crop * ratio, self.crop * ratio)
        image, label = resize_pair(image, label, size)
        top, left, h, w = cat_max_crop_box(label, self.crop, self.cat_max_ratio)
        image, label = image[:, top : top + h, left : left + w], label[top : top + h, left : left + w]
        if random.random() < self.flip:
            image, label = image.flip(-1), label.flip(-1)
        image = image.float()
        if self.photometric:
            image = photometric_distortion(image)
        image = normalize(image, self.mean, self.std)
        return pad_pair(image, label, self.crop)


def pad_pair(image: torch.Tensor, label: torch.Tensor, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom/right to crop×crop: image with 0, label with 255 (ignored)."""
    pad_h, pad_w = max(crop - image.shape[-2], 0), max(crop - image.shape[-1], 0)
    if not (pad_h or pad_w):
        return image, label.long()
    image = torch.nn.functional.pad(image, (0, pad_w, 0, pad_h), value=0.0)
    label = torch.nn.functional.pad(label, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
    return image, label.long()


class EvalTransform:
    """Keep-ratio resize to short side `crop` (long side ≤ 4·crop), normalise; the label keeps its size.

    The target dict carries what evaluation and drawing need: `label` (original size, reduced), `size`
    (original H, W) and the normalisation statistics.
    """

    def __init__(self, crop: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.crop = crop
        self.mean, self.std = mean, std

    def image(self, image: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        height, width = image.shape[-2:]
        resized = TF.resize(
            image, list(rescale_size(height, width, 4 * self.crop, self.crop)), antialias=True
        )
        target = {"size": (height, width), "mean": self.mean, "std": self.std}
        return normalize(resized, self.mean, self.std), target

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        image, target = self.image(image)
        target["label"] = label.long()
        return image, target


def collate_segmentation(batch: list[tuple[torch.Tensor, Any]]) -> tuple[Any, Any]:
    """Training crops stack into tensors; evaluation images keep their own sizes and come as lists."""
    images, targets = zip(*batch, strict=True)
    if isinstance(targets[0], dict):
        return list(images), list(targets)
    return torch.stack(images), torch.stack(targets)


class Ade20kDataModule(ResumableDataModule):
    """ADE20K under `root` with mmseg's augmentation; the crop size is the model's highest resolution.

    `num_classes` counts classes after reduce-zero-label (150 for ADE20K). `synthetic`, when set, writes the
    embedded shapes in this layout on first use (arguments of `ensure_ade20k_layout`; 8 classes).
    """

    collate_fn = staticmethod(collate_segmentation)

    def __init__(
        self,
        root: str,
        input_size: int,
        num_classes: int = 150,
        batch_size: int = 2,
        eval_batch_size: int | None = 1,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        seed: int = 0,
        ratio_range: tuple[float, float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip: float = 0.5,
        photometric: bool = True,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        synthetic: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, persistent_workers, seed)
        self.root = Path(root)
        self.crop = input_size
        self._num_classes = num_classes
        self.mean, self.std = tuple(mean), tuple(std)
        self.train_transform = TrainTransform(
            input_size, tuple(ratio_range), cat_max_ratio, flip, photometric, self.mean, self.std
        )
        self.eval_transform = EvalTransform(input_size, self.mean, self.std)
        self.synthetic = synthetic
        self.sets: dict[str, Ade20kSplit] = {}

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def class_names(self) -> list[str] | None:
        """Names of classes 0..num_classes-1 (after reduction), kept in checkpoints for drawing: from the
        synthetic manifest, or ADE20K's `objectInfo150.txt` (tab-separated, name last); None if neither."""
        manifest = self.root / MANIFEST_NAME
        if manifest.is_file():
            return list(json.loads(manifest.read_text()).get("labels", ["other"])[1:]) or None
        info = self.root / ADE20K_DIR / "objectInfo150.txt"
        if not info.is_file():
            return None
        rows = [line.split("\t") for line in info.read_text().splitlines()[1:] if line.strip()]
        names = [row[-1].split(";")[0].strip() for row in rows]
        return names if len(names) == self._num_classes else None

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            from piip.data.synthetic import ensure_ade20k_layout

            ensure_ade20k_layout(self.root, **self.synthetic)

    def split(self, split: str) -> Ade20kSplit:
        if split not in self.sets:
            self.sets[split] = Ade20kSplit(self.root, split, self._num_classes)
        return self.sets[split]

    def train_dataset(self) -> SeededTransform:
        return SeededTransform(self.split("train"), self.train_transform, self.seed, pairwise=True)

    def val_dataset(self) -> SeededTransform:
        return SeededTransform(
            self.split("val"), self.eval_transform, self.seed, random_transform=False, pairwise=True
        )

    def prediction_input(self, path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
        """An image file prepared as evaluation prepares it, and the target `SegmentationTask.annotate` reads
        (original size, normalisation); no label."""
        return self.eval_transform.image(TF.pil_to_tensor(load_rgb(str(path))))
