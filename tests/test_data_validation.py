"""COCO data is checked when the data module sets up, before any training: every bad input is one `DataError`
naming the file and the record; boxes-only data trains and scores boxes only when the task says so; counts
are logged; the outcome is cached, so a second set-up opens no image.

Each folder here is built by `coco_folder`: 2 train and 2 val images of 30x20 with one square each, a
variant changing only what its test is about.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from piip.data.coco import CocoDataModule
from piip.errors import DataError

W, H = 30, 20


def ann(ann_id: int, image_id: int, **fields: Any) -> dict[str, Any]:
    """A valid 6x6 square at (2, 2) with its polygon; `fields` replace or (value None) remove fields."""
    record = {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "bbox": [2, 2, 6, 6],
        "area": 36,
        "iscrowd": 0,
        "segmentation": [[2, 2, 8, 2, 8, 8, 2, 8]],
    }
    record.update(fields)
    return {k: v for k, v in record.items() if v is not None}


def write_split(root: Path, split: str, annotations: list[Any], sizes: list[tuple[int, int]]) -> Path:
    """Images of `sizes` (each recorded as W x H) and the annotation file of one split."""
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i, size in enumerate(sizes, start=1):
        Image.new("RGB", size, (60 * i, 0, 0)).save(folder / f"{i:012d}.jpg")
        images.append({"id": i, "file_name": f"{i:012d}.jpg", "width": W, "height": H})
    dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "square"}]}
    file = root / "annotations" / f"instances_{split}.json"
    file.parent.mkdir(exist_ok=True)
    file.write_text(json.dumps(dataset))
    return file


def coco_folder(
    root: Path, val: list[Any] | None = None, val_sizes: list[tuple[int, int]] | None = None
) -> Path:
    write_split(root, "train2017", [ann(1, 1), ann(2, 2)], [(W, H), (W, H)])
    write_split(root, "val2017", [ann(11, 1), ann(12, 2)] if val is None else val, val_sizes or [(W, H)] * 2)
    return root


def datamodule(root: Path, **kwargs: Any) -> CocoDataModule:
    kwargs = {"batch_size": 1, "num_workers": 0, "pin_memory": False, **kwargs}
    return CocoDataModule(str(root), input_size=32, scale=[32, 32], **kwargs)


def refused(root: Path, stage: str = "fit", **kwargs: Any) -> str:
    """The message of the set-up error."""
    with pytest.raises(DataError) as err:
        datamodule(root, **kwargs).setup(stage)
    return str(err.value)


VAL_FILE = "instances_val2017.json"


# -- 4: boxes-only annotations --------------------------------------------------------------------------
def test_boxes_only_annotations_are_refused_at_setup_naming_the_file_and_annotation(tmp_path: Path) -> None:
    root = coco_folder(tmp_path, val=[ann(11, 1), ann(12, 2, segmentation=[])])
    message = refused(root)
    assert VAL_FILE in message and "annotation 12 (image 2) has no segmentation" in message
    assert "task.module.evaluate_masks=false" in message


def test_boxes_only_data_trains_and_scores_boxes_only_when_masks_are_off(tmp_path: Path) -> None:
    from piip.evaluation import coco as coco_metrics

    root = coco_folder(tmp_path, val=[ann(11, 1, segmentation=[]), ann(12, 2, segmentation=None)])
    data = datamodule(root)
    data.fit_to_task(masks=False)
    data.setup("fit")  # accepted now
    _, target = data.split("val")[0]
    assert target["masks"].shape == (1, H, W) and int(target["masks"].sum()) == 36  # the box is the mask
    ground_truth = data.ground_truth()
    assert coco_metrics.iou_types(False) == ("bbox",)
    perfect = [
        {"image_id": a["image_id"], "category_id": 1, "bbox": a["bbox"], "score": 1.0}
        for a in ground_truth.dataset["annotations"]
    ]
    assert coco_metrics.evaluate(ground_truth, perfect, "bbox")["mAP"] == pytest.approx(1.0)
    with pytest.raises(DataError, match=f"{VAL_FILE}: annotation 11 .*evaluate_masks=false"):
        coco_metrics.evaluate(ground_truth, perfect, "segm")  # pycocotools would crash deep inside


def test_a_boxes_only_detection_task_logs_bbox_metrics_only(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from piip.run.config import backbone_dict, compose
    from piip.tasks.detection import DetectionTask

    root = coco_folder(tmp_path, val=[ann(11, 1, segmentation=[]), ann(12, 2, segmentation=[])])
    backbone = backbone_dict(compose("train", ["task=shapes_det"]))
    task = DetectionTask(backbone, {"lr": 1e-3}, num_classes=1, evaluate_masks=False)
    data = datamodule(root)
    data.fit_to_task(**task.data_needs())
    task.attach_data(data)
    data.setup("validate")
    task._trainer = SimpleNamespace(is_global_zero=True, testing=False, strategy=SimpleNamespace())
    task._trainer.strategy.broadcast = lambda metrics, src: metrics
    logged: dict[str, float] = {}
    task.log = lambda name, value, **_: logged.__setitem__(name, value)
    boxes = [{"image_id": i, "category_id": 1, "bbox": [2, 2, 6, 6], "score": 1.0} for i in (1, 2)]
    task._found = {i: {"bbox": [b], "segm": []} for i, b in zip((1, 2), boxes, strict=True)}
    task.on_validation_epoch_end()
    assert logged["val/bbox_mAP"] == pytest.approx(1.0)
    assert not [name for name in logged if "segm" in name]


# -- 5: silently wrong metrics ----------------------------------------------------------------------------
def test_an_image_whose_size_differs_from_the_file_is_refused(tmp_path: Path) -> None:
    root = coco_folder(tmp_path, val_sizes=[(W, H), (2 * W, H)])
    message = refused(root)
    assert VAL_FILE in message and "image 2:" in message and f"{2:012d}.jpg" in message
    assert f"is {2 * W}x{H} (width x height) but the file records {W}x{H}" in message


def test_an_empty_annotation_list_is_refused(tmp_path: Path) -> None:
    message = refused(coco_folder(tmp_path, val=[]))
    assert f"{VAL_FILE} has no annotations; expected at least one" in message


def test_a_split_without_images_or_without_usable_annotations_is_refused(tmp_path: Path) -> None:
    root = coco_folder(tmp_path, val=[ann(11, 1, iscrowd=1), ann(12, 2, bbox=[2, 2, 0, 6])])
    assert f"{VAL_FILE}: none of its 2 annotations can be used (1 crowd, 1 boxes under 1 pixel)" in refused(
        root
    )
    file = root / "annotations" / VAL_FILE
    file.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    assert f"{VAL_FILE} lists no images" in refused(root)


def test_annotations_of_unknown_images_are_refused(tmp_path: Path) -> None:
    message = refused(coco_folder(tmp_path, val=[ann(11, 1), ann(12, 99)]))
    assert f"{VAL_FILE}: annotation 12: image_id 99 is not listed in 'images'" in message


# -- 6: malformed fields name the file and the record --------------------------------------------------------
RLE_COUNTS = [2 * H + 2, 6, H - 6, 6, H * (W - 4) + 2 - 2 * H]  # a 6x2 block, summing to H x W


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (
            ann(12, 2, segmentation=[[2, 2, 8, 2]]),
            "annotation 12 (image 2): segmentation polygon 0 has 4 numbers",
        ),
        (ann(12, 2, segmentation=[[2, 2, 8, 2, 8, 8, 2]]), "polygon 0 has 7 numbers; expected x, y pairs"),
        (ann(12, 2, segmentation=[[2, 2, 8, "x", 8, 8]]), "polygon 0 must be a list of numbers"),
        (ann(12, 2, segmentation="x"), "annotation 12 (image 2): segmentation must be polygons"),
        (
            ann(12, 2, segmentation={"counts": RLE_COUNTS}),
            "RLE 'size' is None; expected [height, width] = [20, 30]",
        ),
        (ann(12, 2, segmentation={"size": [H, W], "counts": 5}), "RLE 'counts' must be a string or a list"),
        (ann(12, 2, segmentation={"size": [H, W], "counts": [5, 5]}), "'counts' add up to 10; expected"),
        (ann(12, 2, bbox=None), "annotation 12 (image 2): bbox None; expected [x, y, width, height]"),
        (ann(12, 2, bbox=[1, 2, 3]), "bbox [1, 2, 3]; expected [x, y, width, height]"),
        (ann(12, 2, bbox=[1, 2, "3", 4]), "bbox [1, 2, '3', 4]; expected"),
        (ann(12, 2, bbox=[1, 2, -3, 4]), "width, height >= 0"),
        (
            ann(12, 2, category_id=5),
            "annotations use category ids [5] not listed in categories (first: annotation 12",
        ),
        (ann(12, 2, category_id=None), "category ids ['None'] not listed"),
        (ann(12, 2, iscrowd=None), "annotation 12 (image 2): expected 'iscrowd' 0 or 1"),
        (ann(12, 2, area=None), "annotation 12 (image 2): expected a number 'area' >= 0"),
        (ann(None, 2), "annotations[1]: expected an integer 'id', got None"),
        (ann(11, 2), "annotation id 11 is used twice"),
        (ann(12, "2"), "annotation 12: image_id '2' is not listed"),
        ([12], "annotations[1]: expected an object, got [12]"),
    ],
)
def test_malformed_annotations_name_the_file_and_the_annotation(
    tmp_path: Path, bad: Any, expected: str
) -> None:
    message = refused(coco_folder(tmp_path, val=[ann(11, 1), bad]))
    assert message.startswith(str(tmp_path / "annotations" / VAL_FILE)) and expected in message


def test_malformed_files_and_image_records_name_the_file(tmp_path: Path) -> None:
    root = coco_folder(tmp_path)
    file = root / "annotations" / VAL_FILE
    dataset = json.loads(file.read_text())
    file.write_text(json.dumps([dataset]))
    assert f"{VAL_FILE} is not a COCO instances file: expected a JSON object" in refused(root)
    latin1 = b'{"images": [], "info": "caf\xe9"}'
    file.write_bytes(latin1)
    assert f"{VAL_FILE} is not UTF-8 text: byte offset {latin1.index(233)}" in refused(root)
    dataset["images"][1].pop("width")
    file.write_text(json.dumps(dataset))
    assert f"{VAL_FILE}: image 2: expected positive integer 'width' and 'height'" in refused(root)


def test_missing_and_unreadable_images_name_the_file_and_the_image(tmp_path: Path) -> None:
    root = coco_folder(tmp_path)
    (root / "val2017" / f"{2:012d}.jpg").unlink()
    (root / "val2017" / f"{1:012d}.jpg").write_bytes(b"not an image")
    message = refused(root)
    assert message.startswith(str(root / "annotations" / VAL_FILE))
    assert f"image 1: {root / 'val2017' / f'{1:012d}.jpg'} does not open as an image" in message
    assert f"image 2: {root / 'val2017' / f'{2:012d}.jpg'} does not exist" in message


# -- what a good split gives ----------------------------------------------------------------------------
def test_the_embedded_data_validates_cleanly_and_the_counts_are_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from piip.data.synthetic.coco import write_coco_layout

    root = write_coco_layout(tmp_path / "coco", train_images=6, val_images=3, image_size=64, seed=0)
    with caplog.at_level(logging.INFO, logger="piip.data.coco"):
        datamodule(root).setup("fit")
    lines = [r.getMessage() for r in caplog.records if r.name == "piip.data.coco"]
    assert len(lines) == 2 and "instances_train2017.json: 6 images" in lines[0]
    assert "crowd (dropped in training)" in lines[0] and "used" in lines[0]
    assert "instances_val2017.json: 3 images" in lines[1] and "annotations:" in lines[1]


def test_a_second_setup_opens_no_image_and_a_changed_file_is_checked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from piip.data import validate

    opened: list[str] = []
    real = validate.image_size
    monkeypatch.setattr(validate, "image_size", lambda path: opened.append(Path(path).name) or real(path))
    root = coco_folder(tmp_path)
    datamodule(root).setup("fit")
    assert len(opened) == 4 and (root / "annotations" / f".{VAL_FILE}.checked.json").is_file()
    opened.clear()
    datamodule(root).setup("fit")
    assert opened == []
    image = root / "val2017" / f"{2:012d}.jpg"
    Image.new("RGB", (W + 1, H)).save(image)
    os.utime(image, ns=(1, 1))  # a new mtime even on coarse clocks
    assert "image 2:" in refused(root) and opened == [image.name]
    Image.new("RGB", (W, H)).save(image)
    file = root / "annotations" / VAL_FILE
    file.write_text(file.read_text().replace('"iscrowd": 0', '"iscrowd": 7', 1))
    assert "annotation 11 (image 1): expected 'iscrowd' 0 or 1" in refused(root)


def test_the_cache_can_live_in_its_own_folder(tmp_path: Path) -> None:
    root = coco_folder(tmp_path / "data")
    datamodule(root, cache_dir=str(tmp_path / "cache")).setup("validate")
    assert len(list((tmp_path / "cache").glob("instances_val2017-*.checked.json"))) == 1
    assert not list((root / "annotations").glob(".*"))


def test_a_corrupt_or_foreign_cache_is_ignored_and_rewritten(tmp_path: Path) -> None:
    root = coco_folder(tmp_path)
    cache = root / "annotations" / f".{VAL_FILE}.checked.json"
    cache.write_text('{"version": 1, "headers": "no"')
    datamodule(root).setup("validate")
    record = json.loads(cache.read_text())
    assert record["annotation_file"] == str((root / "annotations" / VAL_FILE).resolve())
    assert sorted(record["headers"]) == [f"{1:012d}.jpg", f"{2:012d}.jpg"]
