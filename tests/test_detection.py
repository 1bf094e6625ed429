"""Mask R-CNN on the PIIP pyramid, COCO results/COCOeval, and the detection resize/crop transforms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchmetrics.detection import MeanAveragePrecision
from torchvision import tv_tensors

from piip.data.coco import CocoInstances, collate_detection
from piip.data.transforms import (
    DetectionAugmentation,
    KeepRatioResize,
    RandomSizeCrop,
    keep_ratio_size,
)
from piip.errors import ConfigError
from piip.evaluation import coco as coco_metrics
from piip.models.heads.mask_rcnn import MaskRCNNConfig
from piip.run.config import backbone_dict, compose
from piip.tasks.detection import DetectionTask

SLIM = {
    "fpn_channels": 32,
    "size_divisible": 64,
    "anchor_sizes": [8, 16, 32, 64, 128],
    "box_head_dim": 64,
    "mask_head_channels": 16,
    "box_batch_size_per_image": 32,
    "rpn_batch_size_per_image": 32,
}


def tiny_task(**detector: object) -> DetectionTask:
    backbone = backbone_dict(compose("train", ["task=shapes_det"]))
    optim = {"lr": 1e-3, "ema_decay": None}
    return DetectionTask(backbone, optim, num_classes=8, detector={**SLIM, **detector})


@pytest.fixture(scope="module")
def coco_split(tmp_path_factory: pytest.TempPathFactory) -> CocoInstances:
    from piip.data.synthetic.coco import write_coco_layout

    root = write_coco_layout(
        tmp_path_factory.mktemp("coco"), train_images=2, val_images=10, image_size=96, seed=3
    )
    return CocoInstances(root / "val2017", root / "annotations" / "instances_val2017.json", train=False)


# -- the detector ----------------------------------------------------------------------------------------
def test_pyramid_has_exact_strides_of_the_padded_batch_and_training_gives_every_loss():
    task = tiny_task().train()
    images = [torch.rand(3, 128, 100) * 255, torch.rand(3, 90, 128) * 255]
    padded = task.detector.pad(images).tensors
    assert tuple(padded.shape[-2:]) == (128, 128)  # both sides padded up to a multiple of 64
    levels = task.detector.neck(task.detector.backbone(padded).pyramid)
    assert [tuple(f.shape[-2:]) for f in levels.values()] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    targets = [
        {"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([3]),
         "masks": torch.zeros(1, 128, 100, dtype=torch.uint8)},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
         "masks": torch.zeros(0, 90, 128, dtype=torch.uint8)},
    ]  # fmt: skip
    losses = task(images, targets)
    assert set(losses) == {
        "loss_objectness",
        "loss_rpn_box_reg",
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
    }
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert task.backbone.branches[0].patch_embed.proj.weight.grad is not None


def test_detections_come_back_at_the_stored_image_size():
    task = tiny_task(box_score_thresh=0.0).eval()
    image = torch.rand(3, 64, 96) * 255  # the loader resized a 128 x 192 stored image by 0.5
    with torch.no_grad():
        (found,) = task([image], [{"orig_size": torch.tensor([128, 192])}])
    assert len(found["boxes"]) > 0
    assert found["masks"].shape[-2:] == (128, 192)
    assert found["boxes"][:, 2].max() <= 192 and found["boxes"][:, 3].max() <= 128
    assert found["boxes"][:, 2].max() > 96  # scaled up, not left in the resized frame


def test_bf16_autocast_keeps_the_losses_finite():
    task = tiny_task().train()
    images = [torch.rand(3, 128, 128) * 255]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 72.0, 90.0]]), "labels": torch.tensor([1]),
                "masks": torch.ones(1, 128, 128, dtype=torch.uint8)}]  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = task(images, targets)
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())


def test_padding_divisor_and_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="size_divisible=48: expected a multiple of 32"):
        tiny_task(size_divisible=48)
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['fpn_chanels'\]"):
        MaskRCNNConfig.from_dict({"fpn_chanels": 64})
    with pytest.raises(ConfigError, match="anchor_sizes: expected 5 sizes"):
        MaskRCNNConfig.from_dict({"anchor_sizes": [32, 64]})


def test_backbone_parameters_are_registered_once():
    task = tiny_task()
    names = list(task.state_dict())
    assert any(n.startswith("backbone.") for n in names)
    assert not any(n.startswith("detector.") and ".branches." in n for n in names)
    counted = sum(p.numel() for p in task.parameters())
    assert counted == sum(p.numel() for p in task.backbone.parameters()) + sum(
        p.numel() for p in task.detector.parameters()
    )


# -- COCO results and COCOeval ---------------------------------------------------------------------------
def noisy_predictions(split: CocoInstances, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Per image: jittered ground truth with random scores, some wrong labels, some spurious boxes."""
    rng = np.random.default_rng(seed)
    predictions, targets = [], []
    for index in range(len(split)):
        image, target = split[index]
        height, width = image.shape[-2:]
        boxes = target["boxes"].as_subclass(torch.Tensor).clone()
        boxes += torch.from_numpy(rng.normal(0, 3, boxes.shape)).float()
        labels = target["labels"].clone()
        flip = torch.from_numpy(rng.random(len(labels)) < 0.2)
        labels[flip] = labels[flip] % 8 + 1
        spurious = torch.tensor([[5.0, 5.0, 40.0, 30.0]])
        masks = target["masks"].as_subclass(torch.Tensor).float()
        masks = torch.cat([masks, torch.zeros(1, height, width)])[:, None]
        predictions.append(
            {
                "boxes": torch.cat([boxes, spurious]).clamp(min=0),
                "labels": torch.cat([labels, torch.tensor([2])]),
                "scores": torch.from_numpy(rng.random(len(labels) + 1)).float(),
                "masks": masks,
            }
        )
        targets.append(annotation_targets(split, int(target["image_id"])))
    return predictions, targets


def annotation_targets(split: CocoInstances, image_id: int) -> dict[str, torch.Tensor]:
    """Ground truth as the annotation file has it (unclipped boxes, crowds, areas), for torchmetrics."""
    anns = split.coco.imgToAnns.get(image_id, [])
    info = split.coco.imgs[image_id]
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    masks = [torch.from_numpy(split.coco.annToMask(a)) for a in anns]
    return {
        "boxes": boxes,
        "labels": torch.tensor([split.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
        "masks": torch.stack(masks).bool()
        if masks
        else torch.zeros(0, info["height"], info["width"], dtype=torch.bool),
        "iscrowd": torch.tensor([a["iscrowd"] for a in anns], dtype=torch.int64),
        "area": torch.tensor([a["area"] for a in anns], dtype=torch.float64),
    }


def our_scores(split: CocoInstances, predictions: list[dict]) -> dict[str, dict[str, float]]:
    entries: dict[str, list[dict]] = {"bbox": [], "segm": []}
    for image_id, found in zip(split.image_ids, predictions, strict=True):
        bbox, segm = coco_metrics.results_entries(found, image_id, split.category_ids)
        entries["bbox"] += bbox
        entries["segm"] += segm
    return {kind: coco_metrics.evaluate(split.coco, e, kind) for kind, e in entries.items()}


def test_our_coco_ap_equals_torchmetrics_on_the_same_predictions(coco_split):
    predictions, targets = noisy_predictions(coco_split)
    assert sum(int(t["iscrowd"].sum()) for t in targets) > 0  # crowd regions take part
    ours = our_scores(coco_split, predictions)
    # torchmetrics' default thresholds come from a float32 linspace (0.55 -> 0.5500000119), which flips
    # matches whose IoU sits on a threshold; COCOeval's own float64 thresholds make the comparison exact.
    reference = MeanAveragePrecision(
        iou_type=("bbox", "segm"),
        backend="pycocotools",
        iou_thresholds=np.linspace(0.5, 0.95, 10).tolist(),
        rec_thresholds=np.linspace(0.0, 1.0, 101).tolist(),
    )
    reference.update(
        [{**p, "masks": p["masks"][:, 0] > 0.5} for p in predictions],
        targets,
    )
    theirs = reference.compute()
    for kind in ("bbox", "segm"):
        assert 0.05 < ours[kind]["mAP"] < 0.95  # a score that leaves room to disagree
        for name, key in (("mAP", "map"), ("mAP_50", "map_50"), ("mAP_75", "map_75")):
            assert ours[kind][name] == pytest.approx(float(theirs[f"{kind}_{key}"]), abs=1e-6), (kind, name)


def test_ground_truth_as_predictions_scores_full_ap(coco_split):
    predictions = []
    for index in range(len(coco_split)):
        _, target = coco_split[index]
        keep = torch.tensor(
            [not a["iscrowd"] for a in coco_split.coco.imgToAnns.get(coco_split.image_ids[index], [])
             if a["bbox"][2] >= 1 and a["bbox"][3] >= 1], dtype=torch.bool,
        )  # fmt: skip
        predictions.append(
            {
                "boxes": target["boxes"].as_subclass(torch.Tensor)[keep],
                "labels": target["labels"][keep],
                "scores": torch.ones(int(keep.sum())),
                "masks": target["masks"].as_subclass(torch.Tensor)[keep].float()[:, None],
            }
        )
    scores = our_scores(coco_split, predictions)
    assert scores["segm"]["mAP"] == pytest.approx(1.0)
    assert scores["bbox"]["mAP"] > 0.95  # annotation boxes are polygon extents, a pixel off the masks' boxes


def test_results_entries_are_server_format():
    detection = {
        "boxes": torch.tensor([[10.0, 20.0, 30.0, 60.0]]),
        "labels": torch.tensor([2]),
        "scores": torch.tensor([0.75]),
        "masks": torch.zeros(1, 1, 64, 64),
    }
    detection["masks"][0, 0, 20:60, 10:30] = 0.9
    (bbox,), (segm,) = coco_metrics.results_entries(detection, image_id=42, category_ids=[5, 9])
    assert bbox == {"image_id": 42, "category_id": 9, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.75}
    assert isinstance(segm["segmentation"]["counts"], str)
    decoded = mask_utils.decode({**segm["segmentation"], "counts": segm["segmentation"]["counts"].encode()})
    assert decoded.sum() == 40 * 20 and decoded[20:60, 10:30].all()


def test_evaluate_scores_only_the_images_that_ran(coco_split):
    predictions, _ = noisy_predictions(coco_split)
    first = coco_split.image_ids[:3]
    entries = []
    for image_id, found in zip(first, predictions[:3], strict=True):
        entries += coco_metrics.results_entries(found, image_id, coco_split.category_ids)[0]
    subset = coco_metrics.evaluate(coco_split.coco, entries, "bbox", first)
    everything = coco_metrics.evaluate(coco_split.coco, entries, "bbox")
    assert subset["mAP"] > everything["mAP"]
    assert coco_metrics.evaluate(coco_split.coco, [], "bbox")["mAP"] == 0.0


# -- transforms ------------------------------------------------------------------------------------------
def test_keep_ratio_rule_matches_mmdet():
    assert keep_ratio_size(480, 640, (1333, 800)) == (800, 1067)  # short side binds
    assert keep_ratio_size(400, 1200, (1333, 800)) == (444, 1333)  # long side binds
    assert keep_ratio_size(427, 640, (1568, 941)) == (941, 1410)
    assert DetectionAugmentation.from_config(1568).scale == (1568, 941)


def sample(height: int = 100, width: int = 150) -> tuple[tv_tensors.Image, dict]:
    masks = torch.zeros(2, height, width, dtype=torch.uint8)
    masks[0, 10:50, 10:50] = 1
    masks[1, 80:100, 130:150] = 1
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor([[10.0, 10, 50, 50], [130, 80, 150, 100]]),
            format="XYXY",
            canvas_size=(height, width),
        ),
        "masks": tv_tensors.Mask(masks),
        "labels": torch.tensor([1, 2]),
        "image_id": torch.tensor(7),
    }
    return tv_tensors.Image(torch.zeros(3, height, width, dtype=torch.uint8)), target


def test_resize_moves_boxes_and_masks_together():
    image, target = KeepRatioResize([(300, 150)])(*sample())
    assert image.shape[-2:] == (150, 225)
    assert target["masks"].shape[-2:] == (150, 225)
    assert target["boxes"][0].tolist() == pytest.approx([15.0, 15.0, 75.0, 75.0])
    ys, xs = torch.nonzero(target["masks"][0], as_tuple=True)
    assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (15, 15, 75, 75)


def test_crop_clips_boxes_and_drops_the_emptied_ones():
    torch.manual_seed(0)
    augmentation = DetectionAugmentation.from_config(150, scale=[150, 100], crop=60, flip=0.0)
    transform = augmentation.train_transform()
    seen = set()
    for seed in range(20):
        torch.manual_seed(seed)
        import random

        random.seed(seed)
        image, target = transform(*sample())
        assert image.shape[-2:] == (60, 60)
        assert len(target["boxes"]) == len(target["labels"]) == len(target["masks"])
        boxes = target["boxes"]
        assert (
            (boxes[:, 2] - boxes[:, 0] >= 1).all()
            and (boxes[:, :2] >= 0).all()
            and (boxes[:, 2:] <= 60).all()
        )
        seen.add(len(boxes))
    assert len(seen) > 1  # some crops keep an object, others lose it


def test_multiscale_and_detr_crop_draw_different_sizes():
    import random

    augmentation = DetectionAugmentation.from_config(
        1333,
        train_scales=[[1333, s] for s in range(480, 801, 32)],
        detr_crop={"scales": [[4200, 400], [4200, 500], [4200, 600]], "crop": [384, 600]},
        flip=0.0,
    )
    transform = augmentation.train_transform()
    sizes = set()
    for seed in range(30):
        random.seed(seed)
        torch.manual_seed(seed)
        image, _ = transform(*sample(480, 640))
        sizes.add(tuple(image.shape[-2:]))
    assert len(sizes) > 5
    assert augmentation.eval_transform()(*sample(480, 640))[0].shape[-2:] == (800, 1067)
    with pytest.raises(ConfigError, match=r"task.data.scale: expected \[long, short\]"):
        DetectionAugmentation.from_config(1333, scale=[800])
    with pytest.raises(ValueError, match="min_size <= max_size"):
        RandomSizeCrop(600, 384)


def test_collate_gives_plain_tensors(coco_split):
    images, targets = collate_detection([coco_split[0], coco_split[1]])
    assert type(images[0]) is torch.Tensor and images[0].dtype == torch.uint8
    assert all(type(v) is torch.Tensor for t in targets for v in t.values())
    assert Path(coco_split.annotation_file).name == "instances_val2017.json"


def _gather_on_rank(rank: int, world: int, port: int, queue: object) -> None:
    import os
    from types import SimpleNamespace

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    # rank 1 repeats image 1, as the eval sampler does to even out the shards
    found = {
        1 + rank: {"bbox": [{"image_id": 1 + rank}], "segm": []},
        1: {"bbox": [{"image_id": 1}], "segm": []},
    }
    gathered = DetectionTask._gather(
        SimpleNamespace(_found=found, gather_objects=DetectionTask.gather_objects)
    )
    queue.put((rank, sorted(gathered), sum(len(v["bbox"]) for v in gathered.values())))
    dist.destroy_process_group()


def test_gather_merges_ranks_and_counts_repeated_images_once():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_gather_on_rank, args=(2, port, queue), nprocs=2, start_method="spawn")
    results = sorted(queue.get() for _ in range(2))
    assert results == [(0, [1, 2], 2), (1, [1, 2], 2)]
