"""COCO instances (`train2017/`, `val2017/`, `annotations/instances_*.json`) for torchvision detection models.

Images come out as uint8 `tv_tensors.Image`s resized in the loader workers (mmdet's keep-ratio rule,
`piip.data.transforms`); normalisation and padding happen on the device in the detector. Targets
follow torchvision's convention (`boxes` xyxy, `labels` 1..K contiguous, `masks` N×H×W uint8) plus
`orig_size`, so predictions are mapped back to the stored image for COCO evaluation; `category_ids` maps
labels back to COCO ids for the results JSON.
"""

from __future__ import annotations

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
from piip.data.validate import SplitNeeds, check_sections, read_json, usable_box, validate_split
from piip.errors import DataError

log = logging.getLogger(__name__)


def load_coco(annotation_file: Path, dataset: dict[str, Any] | None = None) -> COCO:
    """pycocotools' index of an instances file. `dataset`: the file as `piip.data.validate.validate_split`
    read and checked it (what `CocoDataModule` does); without it, the file is read here and only its layout
    and category ids are checked."""
    if dataset is None:
        dataset = read_json(annotation_file, "COCO annotation file")
        check_sections(dataset, annotation_file)
        known = {c.get("id") for c in dataset["categories"] if isinstance(c, dict)}
        used = {a.get("category_id") for a in dataset["annotations"] if isinstance(a, dict)}
        unknown = sorted(used - known, key=str)
        if unknown:
            raise DataError(
                f"{annotation_file}: annotations use category ids {unknown} not listed in categories"
            )
    coco = COCO()
    coco.dataset = dataset
    coco.createIndex()
    coco.source = str(annotation_file)  # named by evaluation errors (piip.evaluation.coco)
    return coco


class CocoInstances(torch.utils.data.Dataset):
    """One split: `(image, target)` pairs; crowd regions are dropped in training, degenerate boxes skipped.

    `dataset`: the annotation file already read and checked (`CocoDataModule` passes it); else read here."""

    def __init__(
        self, image_dir: Path, annotation_file: Path, train: bool, dataset: dict[str, Any] | None = None
    ) -> None:
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        self.coco = load_coco(self.annotation_file, dataset)
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
            box = usable_box(ann["bbox"], width, height)
            if box is None:
                continue  # zero, negative or out-of-image boxes are skipped, as the reference toolkits do
            boxes.append(box)
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

    Each split is checked when first used (`setup` uses both before fitting): `piip.data.validate`, with its
    outcome cached beside the annotation file, or in `cache_dir` when given (e.g. for read-only data).
    Segmentations are required unless the task evaluates boxes only (`fit_to_task(masks=False)`).
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
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, persistent_workers, seed)
        self.root = Path(root)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.masks = True  # segmentations are trained and evaluated (the task may say otherwise)
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

    def fit_to_task(self, masks: bool = True, **_: Any) -> None:
        """`masks=False`: the task evaluates boxes only, so annotations without segmentation are accepted."""
        if bool(masks) != self.masks:
            self.masks = bool(masks)
            self.sets.clear()  # checked for the other use

    def setup(self, stage: str) -> None:
        """Check the splits this stage reads (both before fitting), then the shared checks (batch sizes)."""
        for split in ("train", "val") if stage == "fit" else ("val",):
            self.split(split)
        super().setup(stage)

    def annotation_file(self, split: str) -> Path:
        return self.root / "annotations" / f"instances_{self.splits[split]}.json"

    def split(self, split: str) -> CocoInstances:
        """One split, checked (`piip.data.validate`) and its counts logged when first used."""
        if split not in self.sets:
            train = split == "train"
            file, image_dir = self.annotation_file(split), self.root / self.splits[split]
            needs = SplitNeeds(train=train, masks=self.masks)
            dataset, report = validate_split(file, image_dir, needs, self.cache_dir)
            log.info("COCO %s split %s: %s", split, file, report.describe(train))
            self.sets[split] = CocoInstances(image_dir, file, train=train, dataset=dataset)
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
