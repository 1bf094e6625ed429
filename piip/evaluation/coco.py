"""COCO evaluation the official way: detections → results JSON entries → pycocotools `COCOeval`.

The entries are exactly what the COCO evaluation server accepts (`image_id`, `category_id`, `bbox` as
xywh in stored-image pixels, `score`, and `segmentation` as compressed RLE for masks), so the numbers we
log are the numbers anyone gets from the JSON we write.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from piip.errors import DataError

log = logging.getLogger(__name__)

# COCOeval.stats order for iouType bbox/segm, named as mmdet logs them (bbox_mAP, bbox_mAP_50, ...)
STAT_NAMES = ("mAP", "mAP_50", "mAP_75", "mAP_s", "mAP_m", "mAP_l")
IOU_TYPES = ("bbox", "segm")


def iou_types(masks: bool) -> tuple[str, ...]:
    """What a run scores: boxes and masks, or boxes only (`task.module.evaluate_masks=false`, for
    annotation files without segmentations, which COCOeval's `segm` cannot read)."""
    return IOU_TYPES if masks else ("bbox",)


def results_entries(
    detection: dict[str, torch.Tensor],
    image_id: int,
    category_ids: Sequence[int],
    mask_threshold: float = 0.5,
) -> tuple[list[dict], list[dict]]:
    """One image's torchvision detections (labels 1..K, xyxy boxes) as COCO bbox and segm entries."""
    boxes = detection["boxes"].detach().float().cpu()
    scores = detection["scores"].detach().float().cpu().tolist()
    labels = detection["labels"].detach().cpu().tolist()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    bbox = [
        {"image_id": image_id, "category_id": category_ids[label - 1], "bbox": box, "score": score}
        for box, score, label in zip(xywh, scores, labels, strict=True)
    ]
    segm: list[dict] = []
    if "masks" in detection:
        binary = (detection["masks"][:, 0] > mask_threshold).to(torch.uint8).cpu().numpy()
        for entry, mask in zip(bbox, binary, strict=True):
            rle = mask_utils.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode("ascii")  # JSON-serialisable, as the server expects
            segm.append({**entry, "segmentation": rle})
    return bbox, segm


def evaluate(
    ground_truth: COCO, entries: list[dict], iou_type: str, image_ids: Sequence[int] | None = None
) -> dict[str, float]:
    """COCOeval's six headline numbers (AP, AP50, AP75, APs, APm, APl) for one iou type.

    `image_ids` are the images that were run (default: all), so a partial validation is not scored as
    misses on the rest; images among them without any prediction count as misses. No prediction at all
    gives zeros; an area range without ground truth gives nan (COCOeval's -1).
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type: expected one of {IOU_TYPES}, got {iou_type!r}")
    if iou_type == "segm":
        check_segmentations(ground_truth)
    if not entries:
        return dict.fromkeys(STAT_NAMES, 0.0)
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        predictions = ground_truth.loadRes(copy.deepcopy(entries))  # loadRes adds fields in place
        evaluator = COCOeval(ground_truth, predictions, iou_type)
        evaluator.params.imgIds = sorted(image_ids if image_ids is not None else ground_truth.getImgIds())
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    log.debug("COCOeval %s:\n%s", iou_type, printed.getvalue())
    return {
        name: float(v) if v >= 0 else float("nan")
        for name, v in zip(STAT_NAMES, evaluator.stats, strict=False)
    }


def check_segmentations(ground_truth: COCO) -> None:
    """`segm` scoring needs every ground-truth annotation's segmentation: without one pycocotools fails deep
    inside COCOeval (after a whole epoch of training). Data modules check this at set-up; this is the guard
    for ground truth that did not come through one."""
    bare = [a.get("id") for a in ground_truth.dataset.get("annotations", []) if not a.get("segmentation")]
    if bare:
        source = getattr(ground_truth, "source", "the ground truth")
        more = f" (and {len(bare) - 1} more)" if len(bare) > 1 else ""
        raise DataError(
            f"{source}: annotation {bare[0]}{more} has no segmentation, so masks cannot be scored; add "
            "segmentations, or set task.module.evaluate_masks=false to evaluate boxes only"
        )
