"""ADE20K layout: pairing and label checks, reduce-zero-label, mmseg's transforms, the DataModule."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from piip.data import Ade20kDataModule
from piip.data.ade20k import (
    Ade20kSplit,
    EvalTransform,
    TrainTransform,
    cat_max_crop_box,
    dominated,
    photometric_distortion,
    random_crop_box,
    reduce_zero_label,
    rescale_size,
    scale_saturation,
)
from piip.data.sampling import SampleKey
from piip.errors import DataError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_pair(root: Path, stem: str, label: np.ndarray, split: str = "training", image: bool = True) -> Path:
    """One image (random colours) and/or its label map in the ADE20K layout; returns the label path."""
    image_dir = root / "ADEChallengeData2016" / "images" / split
    label_dir = root / "ADEChallengeData2016" / "annotations" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    if image:
        pixels = np.random.default_rng(0).integers(0, 256, (*label.shape, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(image_dir / f"{stem}.jpg")
    path = label_dir / f"{stem}.png"
    Image.fromarray(label.astype(np.uint8), mode="L").save(path)
    return path


def test_reduce_zero_label_ignores_other_and_shifts_classes():
    raw = np.array([[0, 1, 5], [150, 255, 2]], dtype=np.uint8)
    assert reduce_zero_label(raw).tolist() == [[255, 0, 4], [149, 255, 1]]


def test_split_yields_reduced_labels_at_image_size(tmp_path):
    write_pair(tmp_path, "a", np.array([[0, 1], [3, 2]]))
    image, label = Ade20kSplit(tmp_path, "train", num_classes=3)[0]
    assert image.shape == (3, 2, 2) and image.dtype == torch.uint8
    assert label.tolist() == [[255, 0], [2, 1]]


def test_label_values_above_num_classes_name_the_file(tmp_path):
    path = write_pair(tmp_path, "bad", np.array([[0, 1], [4, 2]]))
    split = Ade20kSplit(tmp_path, "train", num_classes=3)
    with pytest.raises(DataError, match=rf"{path}.*\[4\]"):
        split[0]


def test_an_image_without_label_names_the_missing_file(tmp_path):
    write_pair(tmp_path, "a", np.zeros((4, 4)))
    (tmp_path / "ADEChallengeData2016" / "images" / "training" / "b.jpg").write_bytes(
        (tmp_path / "ADEChallengeData2016" / "images" / "training" / "a.jpg").read_bytes()
    )
    with pytest.raises(DataError, match=r"b\.jpg has no label map .*b\.png"):
        Ade20kSplit(tmp_path, "train", num_classes=3)


def test_a_label_without_image_and_a_missing_folder_are_errors(tmp_path):
    write_pair(tmp_path, "a", np.zeros((4, 4)))
    write_pair(tmp_path, "orphan", np.zeros((4, 4)), image=False)
    with pytest.raises(DataError, match=r"orphan\.png has no image"):
        Ade20kSplit(tmp_path, "train", num_classes=3)
    with pytest.raises(DataError, match=r"validation"):
        Ade20kSplit(tmp_path, "val", num_classes=3)


# -- transforms -------------------------------------------------------------------------------------------


def test_keep_ratio_rescale_bounds_both_sides():
    assert rescale_size(512, 683, 2048, 512) == (512, 683)
    assert rescale_size(100, 1000, 2048, 512) == (205, 2048)  # the long side limits
    assert rescale_size(10, 20, 256, 64) == (64, 128)


def test_dominated_ignores_255_and_needs_two_classes():
    assert dominated(torch.tensor([0, 0, 0, 1, 255, 255, 255, 255]), 0.75)  # 3/4 of labelled pixels
    assert not dominated(torch.tensor([0, 0, 1, 255, 255, 255, 255, 255]), 0.75)  # 2/3; 255 not counted
    assert dominated(torch.tensor([2, 2, 255]), 0.75)  # a single class
    assert dominated(torch.full((4,), 255), 0.75)


def test_cat_max_crop_prefers_crops_with_several_classes():
    label = torch.zeros(64, 64, dtype=torch.uint8)
    label[:, 48:] = 1  # only crops reaching column 40+ (of 16-wide crops) hold both classes
    plain, ruled = 0, 0
    for seed in range(50):
        random.seed(seed)
        top, left, h, w = random_crop_box(64, 64, 16)
        plain += not dominated(label[top : top + h, left : left + w], 0.75)
        random.seed(seed)
        top, left, h, w = cat_max_crop_box(label, 16, 0.75)
        ruled += not dominated(label[top : top + h, left : left + w], 0.75)
    assert plain < 15 and ruled > 35  # ~4/49 of uniform crops qualify; ten redraws find one most times


def test_cat_max_crop_gives_up_after_ten_tries():
    label = torch.zeros(32, 32, dtype=torch.uint8)  # every crop is dominated
    draws = []
    original = random.randint

    def counting(a: int, b: int) -> int:
        draws.append((a, b))
        return original(a, b)

    random.randint = counting
    try:
        top, left, h, w = cat_max_crop_box(label, 8, 0.75)
    finally:
        random.randint = original
    assert len(draws) == 2 * 11  # the first box and ten redraws, two offsets each
    assert 0 <= top <= 24 and 0 <= left <= 24 and (h, w) == (8, 8)


def test_train_transform_pads_small_crops_with_0_and_255():
    transform = TrainTransform(64, (1.0, 1.0), 0.75, flip=0.0, photometric=False, mean=MEAN, std=STD)
    image = torch.full((3, 10, 100), 128, dtype=torch.uint8)
    label = torch.zeros(10, 100, dtype=torch.uint8)
    label[:, 50:] = 1
    out_image, out_label = transform(image, label)
    assert out_image.shape == (3, 64, 64) and out_label.shape == (64, 64) and out_label.dtype == torch.long
    rows = 26  # 10 * min(256 / 100, 64 / 10) = 25.6 -> 26 rows of image, the rest is padding
    assert (out_label[rows:] == 255).all() and (out_label[:rows] != 255).all()
    assert (out_image[:, rows:] == 0).all()
    assert torch.allclose(
        out_image[:, :rows].mean(dim=(1, 2)), (128 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    )


def test_train_transform_flips_image_and_label_together():
    transform = TrainTransform(8, (1.0, 1.0), 1.0, flip=1.0, photometric=False, mean=MEAN, std=STD)
    image = torch.zeros(3, 8, 32, dtype=torch.uint8)
    image[:, :, :2] = 255
    label = torch.zeros(8, 32, dtype=torch.uint8)
    label[:, :2] = 1  # class 1 marks the bright columns; scale (32, 8) keeps the size
    random.seed(3)
    out_image, out_label = transform(image, label)
    bright = out_image[0] > 0
    assert torch.equal(bright, out_label == 1)


def test_saturation_scaling_keeps_value_and_hue():
    pixel = torch.tensor([200.0, 100.0, 50.0]).view(3, 1, 1)
    assert torch.allclose(scale_saturation(pixel, 1.0), pixel)
    grey = scale_saturation(pixel, 0.0)
    assert torch.allclose(grey, torch.full_like(pixel, 200.0))  # S = 0 keeps V = max
    half = scale_saturation(pixel, 0.5).flatten()
    assert half.tolist() == pytest.approx([200.0, 150.0, 125.0])  # S 0.75 -> 0.375, same hue order
    assert torch.allclose(scale_saturation(pixel, 1.5).max(), torch.tensor(200.0))


def test_photometric_distortion_stays_in_range_and_varies_per_draw():
    image = torch.rand(3, 16, 16) * 255
    outputs = []
    for seed in range(8):
        random.seed(seed)
        out = photometric_distortion(image.clone())
        assert out.shape == image.shape and out.min() >= 0 and out.max() <= 255
        outputs.append(out)
    assert sum(not torch.allclose(out, image) for out in outputs) >= 6  # P(no step at all) = 1/16
    assert not torch.allclose(outputs[0], outputs[1])


def test_eval_transform_resizes_the_image_and_keeps_the_label():
    image = torch.randint(0, 256, (3, 40, 100), dtype=torch.uint8)
    label = torch.randint(0, 3, (40, 100), dtype=torch.uint8)
    out_image, target = EvalTransform(32, MEAN, STD)(image, label)
    assert out_image.shape == (3, 32, 80)
    assert target["size"] == (40, 100) and torch.equal(target["label"], label.long())


# -- the DataModule ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_module(tmp_path_factory: pytest.TempPathFactory) -> Ade20kDataModule:
    root = tmp_path_factory.mktemp("ade") / "shapes_ade20k"
    module = Ade20kDataModule(
        str(root),
        input_size=48,
        num_classes=8,
        batch_size=2,
        eval_batch_size=2,
        num_workers=0,
        pin_memory=False,
        synthetic={"train_images": 4, "val_images": 2, "image_size": 64, "seed": 0},
    )
    module.prepare_data()
    return module


def test_datamodule_batches_train_crops_and_lists_eval_images(synthetic_module):
    images, labels = next(iter(synthetic_module.train_dataloader()))
    assert images.shape == (2, 3, 48, 48) and labels.shape == (2, 48, 48)
    assert set(labels.unique().tolist()) <= set(range(8)) | {255}
    images, targets = next(iter(synthetic_module.val_dataloader()))
    assert [tuple(i.shape) for i in images] == [(3, 48, 48)] * 2
    assert all(t["label"].shape == (64, 64) and t["size"] == (64, 64) for t in targets)
    assert synthetic_module.num_classes == 8


def test_augmentation_is_reproducible_per_sample(synthetic_module):
    dataset = synthetic_module.train_dataset()
    first, again = dataset[SampleKey(1, 3)], dataset[SampleKey(1, 3)]
    other_epoch = dataset[SampleKey(1, 4)]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other_epoch[0])


def test_prediction_input_prepares_any_image_file(synthetic_module, tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.zeros((30, 90, 3), dtype=np.uint8)).save(path)
    image, target = synthetic_module.prediction_input(path)
    assert image.shape == (3, 48, 144) and target["size"] == (30, 90) and "label" not in target


def test_class_names_come_from_the_synthetic_manifest(synthetic_module):
    names = synthetic_module.class_names
    assert names is not None and len(names) == synthetic_module.num_classes and "other" not in names
