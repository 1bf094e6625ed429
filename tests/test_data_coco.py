"""COCO instances for torchvision detectors: encodings, crowd/empty/degenerate handling, labels, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from piip.data.coco import CocoInstances, collate_detection
from piip.data.sampling import SampleKey, SeededTransform
from piip.data.transforms import DetectionAugmentation
from piip.errors import DataError

H, W = 20, 30


def square_mask(x: int, y: int, size: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=np.uint8)
    mask[y : y + size, x : x + size] = 1
    return mask


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    """3 images: polygons + compressed RLE + uncompressed RLE + a crowd; an empty one; a degenerate box."""
    (tmp_path / "val2017").mkdir()
    for i in (1, 2, 3):
        Image.new("RGB", (W, H), (10 * i, 0, 0)).save(tmp_path / "val2017" / f"{i:012d}.jpg")
    compressed = mask_utils.encode(np.asfortranarray(square_mask(20, 2, 6)))
    uncompressed = {"size": [H, W], "counts": [int(v) for v in [2 * H + 4, 4, H - 4, 4, H * (W - 4) + 12]]}
    rle = {"size": [H, W], "counts": compressed["counts"].decode()}
    # (image id, category id, bbox, area, iscrowd, segmentation), annotation ids 1..5
    fields = [
        (1, 3, [2, 2, 4, 4], 16, 0, [[2, 2, 6, 2, 6, 6, 2, 6]]),
        (1, 7, [20, 2, 6, 6], 36, 0, rle),
        (1, 3, [2, 4, 2, 4], 16, 0, uncompressed),
        (1, 7, [10, 10, 5, 5], 25, 1, rle),
        (3, 3, [5, 5, 0, 3], 0, 0, [[5, 5, 5, 8, 5, 8]]),
    ]
    keys = ("image_id", "category_id", "bbox", "area", "iscrowd", "segmentation")
    annotations = [{"id": i, **dict(zip(keys, row, strict=True))} for i, row in enumerate(fields, start=1)]
    dataset = {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "height": H, "width": W} for i in (1, 2, 3)],
        "annotations": annotations,
        "categories": [{"id": 3, "name": "circle"}, {"id": 7, "name": "star"}],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps(dataset))
    return tmp_path


def split(root: Path, train: bool) -> CocoInstances:
    return CocoInstances(root / "val2017", root / "annotations" / "instances_val2017.json", train=train)


def test_labels_are_contiguous_and_map_back_to_coco_ids(coco_root):
    data = split(coco_root, train=False)
    assert data.category_ids == [3, 7] and data.class_names == ["circle", "star"]
    image, target = data[0]
    assert image.shape == (3, H, W) and image.dtype == torch.uint8
    assert target["orig_size"].tolist() == [H, W]
    assert target["labels"].tolist() == [1, 2, 1, 2]  # evaluation keeps the crowd region
    assert [data.category_ids[k - 1] for k in target["labels"].tolist()] == [3, 7, 3, 7]


def test_every_encoding_decodes_inside_its_box(coco_root):
    image, target = split(coco_root, train=True)[0]
    assert len(target["boxes"]) == 3  # the crowd region is dropped in training
    assert target["masks"].shape == (3, H, W) and target["masks"].dtype == torch.uint8
    for box, mask in zip(target["boxes"], target["masks"], strict=True):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        assert len(ys) > 0
        assert xs.min() >= box[0] - 1 and xs.max() <= box[2] and ys.min() >= box[1] - 1 and ys.max() <= box[3]
    assert torch.equal(target["masks"][1], torch.from_numpy(square_mask(20, 2, 6)))


def test_empty_images_and_degenerate_boxes_give_empty_targets(coco_root):
    data = split(coco_root, train=True)
    for index in (1, 2):  # image 2 has no annotation, image 3 only a zero-width box
        _, target = data[index]
        assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
        assert target["masks"].shape == (0, H, W)


def test_flip_moves_boxes_with_the_pixels(coco_root):
    image, target = split(coco_root, train=True)[0]
    always = DetectionAugmentation.from_config(W, scale=[W, H], flip=1.0).train_transform()  # no resize
    flipped_image, flipped = always(image, target)
    assert torch.equal(flipped_image.flip(-1), image)
    assert torch.equal(flipped["masks"].flip(-1), target["masks"])
    assert flipped["boxes"][0].tolist() == [W - 6, 2, W - 2, 6]
    sometimes = DetectionAugmentation.from_config(W, scale=[W, H], flip=0.5).train_transform()
    seeded = SeededTransform(split(coco_root, train=True), sometimes, seed=0, pairwise=True)
    flips = {bool(seeded[SampleKey(0, e)][1]["boxes"][0, 0] != target["boxes"][0, 0]) for e in range(12)}
    assert flips == {True, False}  # both outcomes occur across epochs, each reproducible
    assert torch.equal(seeded[SampleKey(0, 3)][1]["boxes"], seeded[SampleKey(0, 3)][1]["boxes"])


def test_collate_keeps_lists():
    batch = [
        (torch.zeros(3, 4, 5), {"boxes": torch.zeros(0, 4)}),
        (torch.zeros(3, 6, 7), {"boxes": torch.zeros(1, 4)}),
    ]
    images, targets = collate_detection(batch)
    assert [tuple(i.shape) for i in images] == [(3, 4, 5), (3, 6, 7)] and len(targets) == 2


def test_bad_annotation_files_name_the_file(coco_root):
    annotation = coco_root / "annotations" / "instances_val2017.json"
    with pytest.raises(DataError, match="annotation file not found: .*instances_train2017.json"):
        CocoInstances(coco_root / "val2017", coco_root / "annotations" / "instances_train2017.json", True)
    dataset = json.loads(annotation.read_text())
    dataset["annotations"][0]["category_id"] = 99
    annotation.write_text(json.dumps(dataset))
    with pytest.raises(DataError, match=r"instances_val2017.json: annotations use category ids \[99\]"):
        split(coco_root, train=True)
    annotation.write_text("{not json")
    with pytest.raises(DataError, match="instances_val2017.json is not JSON"):
        split(coco_root, train=True)
    annotation.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="not a COCO instances file: missing"):
        split(coco_root, train=True)


def test_missing_image_names_the_file(coco_root):
    (coco_root / "val2017" / f"{2:012d}.jpg").unlink()
    data = split(coco_root, train=True)
    with pytest.raises(DataError, match=f"{2:012d}.jpg is listed in .*instances_val2017.json but missing"):
        data[1]


def test_the_embedded_coco_data_loads_with_every_instance(tmp_path):
    from piip.data.synthetic.coco import COCO_CATEGORY_IDS, write_coco_layout

    root = write_coco_layout(tmp_path / "coco", train_images=6, val_images=3, image_size=64, seed=0)
    train = CocoInstances(root / "train2017", root / "annotations" / "instances_train2017.json", train=True)
    assert train.category_ids == sorted(COCO_CATEGORY_IDS)
    total = crowd = 0
    for index in range(len(train)):
        image, target = train[index]
        anns = train.coco.imgToAnns.get(train.image_ids[index], [])
        crowd += sum(a["iscrowd"] for a in anns)
        total += len(target["boxes"])
        assert image.shape == (3, 64, 64) and target["masks"].shape[1:] == (64, 64)
        expected = [train.coco.annToMask(a) for a in anns if not a["iscrowd"]]
        pairs = zip(target["masks"], expected, strict=True)
        assert all(torch.equal(mask, torch.from_numpy(ann_mask)) for mask, ann_mask in pairs)
    assert total > 0 and total + crowd == sum(len(train.coco.imgToAnns.get(i, [])) for i in train.image_ids)


def test_datamodule_writes_the_embedded_data_and_batches_lists(tmp_path):
    from piip.data.coco import CocoDataModule

    synthetic = {"train_images": 6, "val_images": 3, "image_size": 64, "seed": 0}
    data = CocoDataModule(
        str(tmp_path / "coco"),
        input_size=64,
        scale=[64, 64],
        batch_size=2,
        num_workers=0,
        pin_memory=False,
        synthetic=synthetic,
    )
    data.prepare_data()
    assert data.num_classes == 8
    images, targets = next(iter(data.train_dataloader()))
    assert len(images) == len(targets) == 2 and images[0].shape == (3, 64, 64)
    assert set(targets[0]) == {"boxes", "labels", "masks", "image_id", "orig_size"}
    assert len(data.train_dataloader()) == 3 and len(list(data.val_dataloader())) == 2
    data.load_state_dict({"epoch": 0, "batches_done": 1, "batch_size": 2})  # resumes like every piip loader
    assert len(list(data.train_dataloader())) == 2
