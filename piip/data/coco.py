"""COCO instances (`train2017/`, `val2017/`, `annotations/instances_*.json`) for torchvision detection models.

Images come out as float tensors in [0, 1] at their stored size: resizing, normalisation and padding belong
to the detector's `GeneralizedRCNNTransform`, so they happen exactly once. Targets follow torchvision's
convention (`boxes` xyxy, `labels` 1..K contiguous, `masks` N×H×W uint8); `category_ids` maps labels back
to COCO ids for the results JSON.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision.transforms.functional import pil_to_tensor

from piip.data.base import ResumableDataModule
from piip.data.imagenet import DataError, load_rgb
from piip.data.sampling import SeededTransform

log = logging.getLogger(__name__)


def load_coco(annotation_file: Path) -> COCO:
    """pycocotools' index of an instances file, with errors that name the file."""
    if not annotation_file.is_file():
        raise DataError(f"COCO annotation file not found: {annotation_file}")
    try:
        with open(annotation_file) as f:
            dataset = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{annotation_file} is not JSON: {err}") from err
    missing = [key for key in ("images", "annotations", "categories") if key not in dataset]
    if not isinstance(dataset, dict) or missing:
        raise DataError(f"{annotation_file} is not a COCO instances file: missing {missing}")
    known = {c["id"] for c in dataset["categories"]}
    unknown = sorted({a["category_id"] for a in dataset["annotations"]} - known)
    if unknown:
        raise DataError(f"{annotation_file}: annotations use category ids {unknown} not listed in categories")
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    return coco


class CocoInstances(torch.utils.data.Dataset):
    """One split: `(image, target)` pairs; crowd regions are dropped in training, degenerate boxes skipped."""

    def __init__(self, image_dir: Path, annotation_file: Path, train: bool) -> None:
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        self.coco = load_coco(self.annotation_file)
        self.train = train
        self.image_ids = sorted(self.coco.imgs)
        self.category_ids = sorted(self.coco.cats)  # label k (1-based) is category_ids[k - 1]
        self.label_of = {cat: k + 1 for k, cat in enumerate(self.category_ids)}
        if not self.image_dir.is_dir():
            raise DataError(
                f"COCO image folder not found: {self.image_dir} (named by {self.annotation_file})"
            )

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def class_names(self) -> list[str]:
        return [self.coco.cats[c]["name"] for c in self.category_ids]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        if not path.is_file():
            raise DataError(f"image {path} is listed in {self.annotation_file} but missing")
        image = load_rgb(str(path))
        height, width = image.height, image.width
        boxes, labels, masks = [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if self.train and ann.get("iscrowd", 0):
                continue  # crowd regions are neither positives nor negatives in training (as mmdet does)
            x, y, w, h = ann["bbox"]
            x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
            if x2 - x1 < 1 or y2 - y1 < 1:
                continue  # zero, negative or out-of-image boxes are skipped, as the reference toolkits do
            boxes.append([x1, y1, x2, y2])
            labels.append(self.label_of[ann["category_id"]])
            masks.append(self._mask(ann, height, width))
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.from_numpy(np.stack(masks))
            if masks
            else torch.zeros(0, height, width, dtype=torch.uint8),
            "image_id": torch.tensor(image_id),
        }
        return pil_to_tensor(image).float() / 255.0, target

    @staticmethod
    def _mask(ann: dict[str, Any], height: int, width: int) -> np.ndarray:
        segmentation = ann.get("segmentation")
        if not segmentation:  # boxes only: the box is the mask
            mask = np.zeros((height, width), dtype=np.uint8)
            x, y, w, h = (round(v) for v in ann["bbox"])
            mask[max(y, 0) : y + h, max(x, 0) : x + w] = 1
            return mask
        if isinstance(segmentation, list):  # polygons
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        return mask_utils.decode(rle).astype(np.uint8)


def horizontal_flip(image: torch.Tensor, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Flip image, boxes and masks together."""
    width = image.shape[-1]
    flipped = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    flipped["boxes"] = boxes
    flipped["masks"] = target["masks"].flip(-1)
    return image.flip(-1), flipped


class RandomFlip:
    """Horizontal flip with probability `p`; draws from the RNG `SeededTransform` seeds per sample."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        if torch.rand(()) < self.p:
            return horizontal_flip(image, target)
        return image, target


def collate_detection(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """torchvision detectors take lists: images of different sizes are batched by their transform."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


class CocoDataModule(ResumableDataModule):
    """COCO 2017 layout under `root`; `synthetic` writes the embedded shapes in that layout on first use.

    Images reach the detector unresized (its transform resizes, normalises and pads); training flips
    horizontally with probability `flip`, drawn per sample from the seeded RNG.
    """

    collate_fn = staticmethod(collate_detection)

    def __init__(
        self,
        root: str,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        seed: int = 0,
        flip: float = 0.5,
        train_split: str = "train2017",
        val_split: str = "val2017",
        synthetic: dict[str, Any] | None = None,
        input_size: int | None = None,  # accepted for the shared builder; the detector's transform resizes
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, persistent_workers, seed)
        self.root = Path(root)
        self.flip = flip
        self.splits = {"train": train_split, "val": val_split}
        self.synthetic = synthetic
        self.sets: dict[str, CocoInstances] = {}

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            from piip.data.synthetic import ensure_coco_layout

            ensure_coco_layout(self.root, **self.synthetic)

    def annotation_file(self, split: str) -> Path:
        return self.root / "annotations" / f"instances_{self.splits[split]}.json"

    def split(self, split: str) -> CocoInstances:
        if split not in self.sets:
            self.sets[split] = CocoInstances(
                self.root / self.splits[split], self.annotation_file(split), train=split == "train"
            )
        return self.sets[split]

    @property
    def num_classes(self) -> int:
        return len(self.split("val").category_ids)

    def train_dataset(self) -> SeededTransform:
        return SeededTransform(self.split("train"), RandomFlip(self.flip), self.seed, pairwise=True)

    def val_dataset(self) -> SeededTransform:
        return SeededTransform(
            self.split("val"), _unchanged, self.seed, random_transform=False, pairwise=True
        )


def _unchanged(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    return image, target
