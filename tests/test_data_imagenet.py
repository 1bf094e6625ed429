"""The ImageNet-layout DataModule: loading, transforms, and errors that name the path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from piip.data import ImageFolderDataModule
from piip.data.sampling import SampleKey
from piip.errors import ConfigError, DataError


def write_split(root: Path, split: str, classes: dict[str, int], size: int = 40) -> None:
    for c, (name, count) in enumerate(classes.items()):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            colour = (40 * c % 255, 20 * i % 255, 128)
            Image.new("RGB", (size + i, size), colour).save(folder / f"{name}_{i}.JPEG")


@pytest.fixture
def dataset_root(tmp_path: Path) -> Path:
    write_split(tmp_path, "train", {"a": 6, "b": 6})
    write_split(tmp_path, "val", {"a": 2, "b": 3})
    return tmp_path


def module(root: Path, **kwargs) -> ImageFolderDataModule:
    kwargs.setdefault("train_transform", {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25})
    return ImageFolderDataModule(
        str(root), input_size=32, batch_size=4, num_workers=0, pin_memory=False, **kwargs
    )


def test_batches_have_the_model_input_size_and_labels(dataset_root):
    data = module(dataset_root)
    data.setup("fit")
    assert data.classes == ["a", "b"] and data.num_classes == 2
    images, targets = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert set(targets.tolist()) <= {0, 1}
    val_images, val_targets = next(iter(data.val_dataloader()))
    assert val_images.shape[-2:] == (32, 32)
    assert val_targets.tolist() == [0, 0, 1, 1]  # val is not shuffled
    assert len(data.train_dataloader()) == 3  # 12 images, batch 4, drop_last


def test_training_augmentation_repeats_per_epoch_and_index_and_varies_across_epochs(dataset_root):
    data = module(dataset_root)
    data.setup("fit")
    dataset = data.train_dataloader().dataset
    a, b = dataset[SampleKey(3, 0)][0], dataset[SampleKey(3, 0)][0]
    assert torch.equal(a, b)
    assert not torch.equal(a, dataset[SampleKey(3, 1)][0])
    val = data.val_dataloader().dataset
    assert torch.equal(val[SampleKey(1, 0)][0], val[SampleKey(1, 7)][0])  # evaluation is deterministic


def test_missing_split_names_the_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "val")):
        module(tmp_path).setup("fit")


def test_empty_class_folder_names_the_folder(dataset_root):
    (dataset_root / "val" / "c").mkdir()
    with pytest.raises(DataError, match=rf"{dataset_root / 'val'}.*\bc\b"):
        module(dataset_root).setup("fit")


def test_train_and_val_classes_must_match(dataset_root):
    write_split(dataset_root, "train", {"z": 2})
    with pytest.raises(DataError, match=r"differ in \['z'\]"):
        module(dataset_root).setup("fit")


def test_corrupt_image_stops_with_the_file_name(dataset_root):
    bad = dataset_root / "val" / "a" / "a_0.JPEG"
    bad.write_bytes(b"not a jpeg at all")
    data = module(dataset_root)
    data.setup("validate")
    with pytest.raises(DataError, match=f"cannot read image {bad}"):
        next(iter(data.val_dataloader()))


def test_resume_state_starts_the_loader_where_training_stopped(dataset_root):
    data = module(dataset_root, seed=3)
    data.setup("fit")
    full = [k.index for k in data.train_dataloader().sampler]
    data.load_state_dict({"epoch": 0, "batches_done": 2, "batch_size": 4})
    assert [k.index for k in data.train_dataloader().sampler] == full[8:]
    data.load_state_dict({"epoch": 0, "batches_done": 3, "batch_size": 4})  # epoch was complete
    sampler = data.train_dataloader().sampler
    assert list(sampler) == []  # the finished epoch, if Lightning opens it again, yields nothing
    sampler.set_epoch(1)
    assert len(list(sampler)) == 12


def test_a_train_split_smaller_than_one_batch_is_refused_at_setup(dataset_root):
    data = ImageFolderDataModule(
        str(dataset_root), input_size=32, batch_size=16, num_workers=0, pin_memory=False, seed=0
    )
    with pytest.raises(
        ConfigError, match=r"task\.data\.batch_size=16 is larger than the train split.*12 samples"
    ):
        data.setup("fit")
