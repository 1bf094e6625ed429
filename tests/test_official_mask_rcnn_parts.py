"""piip's mmdet-flavoured Mask R-CNN parts against mmdet 2.x's own code.

Golden values: `fixtures/official/mask_rcnn_parts.pt`, written by `benchmarks/official/mask_rcnn_parts.py`
from the official PIIP tree (anchors and valid flags, box deltas both ways, RoI levels, IoU and
MaxIoUAssigner, pasted masks, test-time RPN proposals and R-CNN detections)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RPNHead, concat_box_prediction_layers
from torchvision.ops.boxes import clip_boxes_to_image

from piip.models.heads.mmdet_ops import (
    STRIDES,
    DeltaXYWHCoder,
    MaxIoUMatcher,
    MMDetAnchorGenerator,
    box_iou,
    map_roi_levels,
    paste_masks,
)
from piip.models.heads.mmdet_rcnn import MMDetRoIHeads, MMDetRPN

GOLDEN = Path(__file__).parent / "fixtures" / "official" / "mask_rcnn_parts.pt"
TOLERANCE = dict(rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(GOLDEN, map_location="cpu", weights_only=True)


def test_anchors_and_valid_flags_are_mmdets(golden):
    for case in golden["anchors"]:
        generator = MMDetAnchorGenerator([case["scale"] * s for s in STRIDES], [0.5, 1.0, 2.0], STRIDES)
        maps = [torch.zeros(1, 1, *size) for size in case["featmap_sizes"]]
        (anchors,) = generator(ImageList(torch.zeros(1, 3, 28, 20), [(28, 20)]), maps)
        torch.testing.assert_close(anchors, torch.cat(case["anchors"]), **TOLERANCE)
        flags = generator.valid_flags(case["featmap_sizes"], case["pad_shape"], torch.device("cpu"))
        assert torch.equal(flags, torch.cat(case["valid_flags"]))


def test_box_deltas_encode_and_decode_as_mmdets_coder_for_the_rpn_and_the_roi_head(golden):
    for case in golden["coder"]:
        coder = DeltaXYWHCoder(case["stds"])
        encoded = coder.encode_single(case["gt"], case["proposals"])
        torch.testing.assert_close(encoded, case["encoded"], **TOLERANCE)
        decoded = coder.decode_single(case["deltas"], case["proposals"])
        torch.testing.assert_close(decoded, case["decoded_unclipped"], **TOLERANCE)
        clipped = clip_boxes_to_image(decoded, case["max_shape"])
        torch.testing.assert_close(clipped, case["decoded"], **TOLERANCE)
        multi = coder.decode_single(case["multi_deltas"], case["proposals"]).reshape(len(decoded), -1, 4)
        clipped = clip_boxes_to_image(multi, case["max_shape"]).reshape(len(decoded), -1)
        torch.testing.assert_close(clipped, case["multi_decoded"], **TOLERANCE)


def test_rois_go_to_mmdets_pyramid_levels_also_on_the_boundaries(golden):
    levels = golden["levels"]
    assert torch.equal(map_roi_levels(levels["boxes"], 4), levels["levels"])
    assert set(levels["levels"].tolist()) == {0, 1, 2, 3}


def test_iou_and_assignments_are_mmdets_max_iou_assigner(golden):
    for record in golden["assign"]:
        iou = box_iou(record["gt"], record["boxes"])
        torch.testing.assert_close(iou, record["iou"], **TOLERANCE)
        for case in record["cases"]:
            matches = MaxIoUMatcher(*case["thresholds"])(iou)
            as_mmdet = torch.where(matches >= 0, matches + 1, torch.where(matches == -1, 0, -1))
            assert torch.equal(as_mmdet, case["gt_inds"]), case["thresholds"]


def test_masks_are_pasted_as_mmdets_paste_and_threshold(golden):
    case = golden["paste"]
    pasted = paste_masks(case["masks"].float(), case["boxes"], *case["size"])
    assert pasted.shape == (len(case["masks"]), 1, *case["size"])
    assert torch.equal(pasted[:, 0].bool(), case["binary"])


def test_rpn_proposals_are_mmdets(golden):
    """Per-level top-k of the sigmoid scores, decode, clip, drop empty boxes, one NMS over the levels."""
    case = golden["rpn"]
    anchor_generator = MMDetAnchorGenerator([8 * s for s in STRIDES], [0.5, 1.0, 2.0], STRIDES)
    maps = [torch.zeros(1, 1, *size) for size in case["featmap_sizes"]]
    (anchors,) = anchor_generator(ImageList(torch.zeros(1, 3, 64, 80), [case["image_shape"]]), maps)
    logits, deltas = concat_box_prediction_layers(
        [x.float()[None] for x in case["scores"]], [x.float()[None] for x in case["deltas"]]
    )
    per_level = [x.numel() for x in case["scores"]]
    for expected in case["cases"]:
        top_n = {"training": expected["nms_pre"], "testing": expected["nms_pre"]}
        kept = {"training": expected["max_per_img"], "testing": expected["max_per_img"]}
        rpn = MMDetRPN(
            anchor_generator, RPNHead(1, 3), batch_size_per_image=256, positive_fraction=0.5,
            pre_nms_top_n=top_n, post_nms_top_n=kept, nms_thresh=0.7, size_divisible=32,
        ).eval()  # fmt: skip
        found = rpn.propose(logits.reshape(-1), deltas, anchors, case["image_shape"], per_level)
        torch.testing.assert_close(found, expected["proposals"], **TOLERANCE)


def test_detections_are_mmdets_from_the_permuted_class_order(golden):
    """Softmax, class-specific decode, clip, rescale to the stored size, score > 0.05, NMS per class, top 100;
    inputs in mmdet's layout are given to piip in torchvision's (background first, zero background deltas)."""
    case = golden["rcnn"]
    logits, deltas, rois = case["logits"].float(), case["deltas"].float(), case["rois"].float()
    heads = MMDetRoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, 100)
    ours_logits = torch.cat([logits[:, -1:], logits[:, :-1]], dim=1)
    ours_deltas = torch.cat([torch.zeros(len(deltas), 4), deltas], dim=1)
    (found,) = heads.boxes_at(
        ours_logits, ours_deltas, [rois], [case["image_shape"]], [case["original_size"]]
    )
    torch.testing.assert_close(found["boxes"], case["boxes"], **TOLERANCE)
    torch.testing.assert_close(found["scores"], case["scores"], **TOLERANCE)
    assert torch.equal(found["labels"], case["labels"] + 1)
