"""Segmentation: mmseg-style scores, sliding-window inference, UperNet/FCN heads, the task's loss and drawing,
and a fast_dev_run of `task=shapes_seg` through Hydra."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train as train_entry
from piip.data.ade20k import EvalTransform
from piip.errors import ConfigError
from piip.evaluation import SegmentationScores, segmentation_scores
from piip.models.heads.sliding import slide_inference, sliding_windows, whole_inference
from piip.models.heads.upernet import FCNHead, UperNetHead
from piip.run.config import backbone_dict, compose
from piip.tasks import SegmentationTask
from piip.tasks.segmentation import segmentation_loss
from tests.test_train import QUIET_CPU_RUN, train_config

# -- scores ------------------------------------------------------------------------------------------------


def test_scores_match_a_hand_computed_confusion_matrix():
    # 4 classes; class 3 appears in neither prediction nor ground truth; the two 255 pixels are ignored
    target = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 255, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 1, 2, 0, 2, 1]])
    metric = SegmentationScores(num_classes=4)
    metric.update(pred[:, :4], target[:, :4])  # accumulated over updates, like batches of a split
    metric.update(pred[:, 4:], target[:, 4:])
    # rows = ground truth: gt0 -> {0, 1}; gt1 -> {1, 1, 1}; gt2 -> {2, 0}
    # IoU: c0 = 1 / (2 + 2 - 1), c1 = 3 / (3 + 4 - 3), c2 = 1 / (2 + 1 - 1); c3 has no union -> excluded
    scores = metric.compute()
    assert scores["mIoU"].item() == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert scores["mAcc"].item() == pytest.approx((1 / 2 + 3 / 3 + 1 / 2) / 3)
    assert scores["aAcc"].item() == pytest.approx(5 / 7)


def test_a_class_only_predicted_counts_as_zero_iou_but_not_in_macc():
    confmat = torch.tensor([[3, 1], [0, 0]])  # class 1 never in the ground truth, predicted once
    scores = segmentation_scores(confmat)
    assert scores["mIoU"].item() == pytest.approx((3 / 4 + 0.0) / 2)
    assert scores["mAcc"].item() == pytest.approx(3 / 4)
    assert scores["aAcc"].item() == pytest.approx(3 / 4)


# -- sliding windows --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(8, 8), (13, 21), (5, 30), (9, 9), (30, 4)])
def test_windows_stay_inside_the_image_and_cover_every_pixel(height, width):
    crop, stride = 8, 5
    windows = sliding_windows(height, width, crop, stride)
    covered = torch.zeros(height, width, dtype=torch.bool)
    for top, bottom, left, right in windows:
        assert 0 <= top < bottom <= height and 0 <= left < right <= width
        assert (bottom - top, right - left) == (min(crop, height), min(crop, width))
        covered[top:bottom, left:right] = True
    assert covered.all()
    tops = sorted({w[0] for w in windows})
    assert all(b - a <= stride for a, b in zip(tops, tops[1:], strict=False))


def test_a_stride_larger_than_the_crop_is_refused():
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(20, 20, crop=8, stride=9)


def test_slide_places_and_averages_window_logits_exactly():
    # a per-pixel model is translation-equivariant: sliding must reproduce the whole-image result everywhere
    conv = torch.nn.Conv2d(3, 5, 1)
    images = torch.randn(2, 3, 19, 26)
    with torch.no_grad():
        slid = slide_inference(conv, images, crop=8, stride=5)
        assert torch.allclose(slid, conv(images), atol=1e-6)
        small = torch.randn(1, 3, 5, 6)  # smaller than the crop: padded, then cut back
        assert torch.allclose(slide_inference(conv, small, crop=8, stride=5), conv(small), atol=1e-6)
        assert torch.allclose(whole_inference(conv, images), conv(images), atol=1e-6)


def test_slide_over_an_image_of_crop_size_equals_whole_inference():
    torch.manual_seed(0)
    head = UperNetHead([8, 8, 8, 8], channels=8, num_classes=3).eval()

    def predict(images: torch.Tensor) -> torch.Tensor:  # a stride-4..32 pyramid made by pooling the input
        x = images.repeat(1, 3, 1, 1)[:, :8]
        return head([F.avg_pool2d(x, s) for s in (4, 8, 16, 32)])

    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        slid = slide_inference(predict, images, crop=64, stride=43)
        whole = whole_inference(predict, images)
    assert slid.shape == (1, 3, 64, 64)
    assert torch.allclose(slid, whole, atol=1e-6)


# -- heads --------------------------------------------------------------------------------------------------


def pyramid(
    batch: int = 2, size: int = 64, channels: tuple[int, ...] = (16, 24, 32, 40)
) -> list[torch.Tensor]:
    return [
        torch.randn(batch, c, size // s, size // s) for c, s in zip(channels, (4, 8, 16, 32), strict=True)
    ]


def test_upernet_predicts_at_stride_4_and_every_level_matters():
    head = UperNetHead([16, 24, 32, 40], channels=12, num_classes=7).eval()
    levels = pyramid()
    with torch.no_grad():
        logits = head(levels)
        assert logits.shape == (2, 7, 16, 16)
        for i in range(4):
            changed = [x + (1.0 if j == i else 0.0) for j, x in enumerate(levels)]
            assert not torch.allclose(head(changed), logits), f"level {i} does not reach the logits"
    assert len(head.ppm.stages) == 4  # pool scales 1, 2, 3, 6
    assert head.ppm.bottleneck[0].in_channels == 40 + 4 * 12
    assert head.fpn_bottleneck[0].in_channels == 4 * 12


def test_fcn_head_reads_level_2_only():
    head = FCNHead(32, channels=8, num_classes=5).eval()
    levels = pyramid()
    with torch.no_grad():
        logits = head(levels)
        assert logits.shape == (2, 5, 4, 4)
        others = [x if i == 2 else torch.zeros_like(x) for i, x in enumerate(levels)]
        assert torch.equal(head(others), logits)


# -- the task -----------------------------------------------------------------------------------------------


def tiny_backbone() -> dict[str, Any]:
    backbone = backbone_dict(compose("train", ["task=shapes_seg"]))
    backbone["resolutions"] = [64, 48, 32]
    return backbone


def tiny_task(**kwargs: Any) -> SegmentationTask:
    args = {"num_classes": 5, "channels": 16, "aux_channels": 8, "slide_stride": None} | kwargs
    return SegmentationTask(backbone=tiny_backbone(), optim={}, **args)


def test_loss_adds_the_weighted_auxiliary_loss():
    torch.manual_seed(0)
    task = tiny_task(aux_weight=0.4).eval()
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    labels[:, :10] = 255
    losses = task.losses_of(images, labels)
    assert losses["aux"].item() > 0 and not torch.allclose(losses["aux"], losses["decode"])
    assert losses["total"].item() == pytest.approx(
        losses["decode"].item() + 0.4 * losses["aux"].item(), rel=1e-6
    )
    task.hparams.aux_weight = 1.0
    assert task.losses_of(images, labels)["total"].item() == pytest.approx(
        losses["decode"].item() + losses["aux"].item(), rel=1e-6
    )


def test_loss_ignores_255_and_survives_fully_ignored_batches():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    labels = torch.tensor([[[0, 255], [2, 255]]])
    expected = F.cross_entropy(logits[..., 0], labels[..., 0])  # the labelled column only
    assert segmentation_loss(logits, labels).item() == pytest.approx(expected.item())
    empty = segmentation_loss(logits, torch.full((1, 2, 2), 255))
    empty.backward()
    assert empty.item() == 0.0 and logits.grad is not None


@pytest.mark.parametrize("inference", ["slide", "whole"])
def test_annotate_draws_at_the_original_size(inference):
    task = tiny_task(inference=inference)
    image = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8)
    prepared, target = EvalTransform(64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).image(image)
    assert prepared.shape[-2:] == (64, 92)  # short side = crop
    (overlay,) = task.annotate([prepared], [target])
    assert overlay.shape == (37, 53, 3) and overlay.dtype == np.uint8
    assert task.training  # annotate restores the mode it found


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"slide_stride": 65}, "slide_stride"), ({"inference": "tiles"}, "inference")],
)
def test_bad_inference_settings_name_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        tiny_task(**kwargs)


def test_ema_is_refused_for_segmentation():
    with pytest.raises(ConfigError, match="ema_decay"):
        SegmentationTask(backbone=tiny_backbone(), optim={"ema_decay": 0.999}, num_classes=5, channels=8)


# -- end to end ---------------------------------------------------------------------------------------------

SEG_RUN = [
    "task=shapes_seg",
    *QUIET_CPU_RUN,
    "task.data.num_workers=0",
    "task.data.batch_size=2",
    "task.data.eval_batch_size=2",
    "task.module.channels=16",
    "task.module.aux_channels=8",
    "task.data.synthetic.train_images=4",
    "task.data.synthetic.val_images=2",
    "task.data.synthetic.image_size=96",
]


@pytest.fixture(scope="module")
def seg_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("seg_data")


def seg_config(tmp_path: Path, data_dir: Path, *overrides: str):
    return train_config(tmp_path, data_dir, *overrides, run=SEG_RUN)


def test_shapes_seg_trains_and_validates_through_hydra(tmp_path, seg_data_dir):
    cfg = seg_config(
        tmp_path,
        seg_data_dir,
        "trainer.max_epochs=1",
        "task.val_every_n_epochs=1",
        "trainer.num_sanity_val_steps=0",
        "test_after_fit=false",
    )
    assert cfg.trainer.sync_batchnorm is False and cfg.trainer.max_steps == -1
    train_entry.train(cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["resolution"] == [128, 96, 64] and results["monitor"] == "val/mIoU"
    for key in ("val/mIoU", "val/mAcc", "val/aAcc"):
        assert 0.0 <= results["metrics"][key] <= 1.0
    assert results["metrics"]["val/loss"] > 0
    images = sorted((tmp_path / "run" / "csv").rglob("val_examples/*.png"))
    assert len(images) == 2  # both val images drawn (num_visualised 4 > 2 images)


def test_shapes_seg_fast_dev_run(tmp_path, seg_data_dir):
    score = train_entry.train(seg_config(tmp_path, seg_data_dir, "debug=fast"))
    assert score is not None and 0.0 <= score <= 1.0  # val/mIoU of the one validation batch


def test_a_dataset_with_other_class_count_is_refused_at_setup(tmp_path, seg_data_dir):
    with pytest.raises(ConfigError, match="task.module.num_classes=8"):
        train_entry.train(seg_config(tmp_path, seg_data_dir, "debug=fast", "task.module.num_classes=9"))


def test_ade20k_recipe_is_iteration_based():
    cfg = compose("train", ["task=ade20k"])
    assert cfg.trainer.max_steps == 80000 and cfg.trainer.max_epochs == -1
    assert cfg.trainer.val_check_interval == 8000 and cfg.trainer.check_val_every_n_epoch is None
    assert cfg.trainer.sync_batchnorm is True and cfg.task.module.num_classes == 150
    classification = compose("train", ["task=imagenet"])
    assert classification.trainer.max_steps == -1 and classification.trainer.val_check_interval is None
