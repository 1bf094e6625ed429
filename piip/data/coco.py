"""COCO instances (`train2017/`, `val2017/`, `annotations/instances_*.json`) for torchvision detection models.

Images come out as uint8 `tv_tensors.Image`s resized in the loader workers (mmdet's keep-ratio rule,
`piip.data.transforms`); normalisation and padding happen on the device in the detector. Targets
follow torchvision's convention (`boxes` xyxy, `labels` 1..K contiguous, `masks` N×H×W uint8) plus
`orig_size`, so predictions are mapped back to the stored image for COCO evaluation; `category_ids` maps
labels back to COCO ids for the results JSON.
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
from torchvision import tv_tensors
from torchvision.transforms.functional import pil_to_tensor

from piip.data.base import ResumableDataModule, load_rgb
from piip.data.sampling import SeededTransform
from piip.data.transforms import DetectionAugmentation, empty_target
from piip.errors import DataError

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
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                format="XYXY",
                canvas_size=(height, width),
            ),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": tv_tensors.Mask(
                torch.from_numpy(np.stack(masks))
                if masks
                else torch.zeros(0, height, width, dtype=torch.uint8)
            ),
            "image_id": torch.tensor(image_id),
            "orig_size": torch.tensor([height, width]),
        }
        return tv_tensors.Image(pil_to_tensor(image)), target

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


def collate_detection(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """torchvision detectors take lists (the detector pads); `tv_tensors` become plain tensors here, so
    box arithmetic in the model does not carry their metadata along."""
    images, targets = zip(*batch, strict=True)
    plain = [{k: v.as_subclass(torch.Tensor) for k, v in t.items()} for t in targets]
    return [image.as_subclass(torch.Tensor) for image in images], plain


class CocoDataModule(ResumableDataModule):
    """COCO 2017 layout under `root`; `synthetic` writes the embedded shapes in that layout on first use.

    Resizing follows `DetectionAugmentation` (single scale from the highest branch resolution unless the
    config names scales); training flips horizontally with probability `flip`. Every random draw comes from
    the per-sample seeded RNG, so a resumed run sees the same augmentations.
    """

    collate_fn = staticmethod(collate_detection)

    def __init__(
        self,
        root: str,
        input_size: int,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        seed: int = 0,
        flip: float = 0.5,
        scale: list[int] | None = None,
        train_scales: list[list[int]] | None = None,
        detr_crop: dict[str, Any] | None = None,
        crop: int | None = None,
        test_scale: list[int] | None = None,
        train_split: str = "train2017",
        val_split: str = "val2017",
        synthetic: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, persistent_workers, seed)
        self.root = Path(root)
        self.augmentation = DetectionAugmentation.from_config(
            input_size,
            scale=scale,
            train_scales=train_scales,
            detr_crop=detr_crop,
            crop=crop,
            test_scale=test_scale,
            flip=flip,
        )
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
        return len(self.category_ids)

    @property
    def category_ids(self) -> list[int]:
        """COCO category id of each contiguous label (label k is `category_ids[k - 1]`)."""
        return self.split("val").category_ids

    @property
    def class_names(self) -> list[str]:
        return self.split("val").class_names

    def ground_truth(self) -> COCO:
        """The validation annotations, as COCOeval reads them."""
        return self.split("val").coco

    def train_dataset(self) -> SeededTransform:
        transform = self.augmentation.train_transform()
        return SeededTransform(self.split("train"), transform, self.seed, pairwise=True)

    def val_dataset(self) -> SeededTransform:
        transform = self.augmentation.eval_transform()
        return SeededTransform(self.split("val"), transform, self.seed, random_transform=False, pairwise=True)

    def prediction_input(self, path: str | Path) -> tuple[tv_tensors.Image, dict[str, torch.Tensor]]:
        """A user's image file, resized as validation images are, with an empty target."""
        image = tv_tensors.Image(pil_to_tensor(load_rgb(str(path))))
        return self.augmentation.eval_transform()(image, empty_target(*image.shape[-2:]))
