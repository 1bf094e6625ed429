"""One-to-one matching of DINO's queries to the ground truths: mmdet 2.x's `HungarianAssigner` with the costs
of every released PIIP DINO config (`FocalLossCost` 2.0, `BBoxL1Cost` 5.0 with `box_format='xywh'`,
`IoUCost` giou 2.0).

Boxes are the head's sigmoid outputs, (cx, cy, w, h) normalised by the image's own unpadded size; the L1
cost compares them normalised, the GIoU cost as pixel corners, as mmdet does (GIoU does not change when both
boxes are scaled per axis, so this matters only for the eps of degenerate boxes, but it keeps the numbers
mmdet's). The cost is solved on the CPU in float32 by scipy; the "1 -" of the GIoU cost is left out as
upstream does, since a constant does not move the optimum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou

FOCAL_EPS = 1e-12  # mmdet's FocalLossCost: keeps log() finite for saturated probabilities


@dataclass
class MatchCosts:
    """Weights of the three matching costs, and the focal cost's alpha and gamma (`train_cfg.assigner`)."""

    focal: float = 2.0
    l1: float = 5.0
    giou: float = 2.0
    alpha: float = 0.25
    gamma: float = 2.0


def pixel_scale(image_size: tuple[int, int], like: Tensor) -> Tensor:
    """[w, h, w, h] of an image given as (h, w): multiplies normalised xyxy boxes into pixels."""
    height, width = (float(side) for side in image_size)
    return like.new_tensor([width, height, width, height])


def pixel_xyxy(boxes: Tensor, scale: Tensor) -> Tensor:
    """Normalised (cx, cy, w, h) boxes as pixel corners; `scale` is [w, h, w, h] per image or per box."""
    return box_convert(boxes, "cxcywh", "xyxy") * scale


def focal_cost(logits: Tensor, labels: Tensor, alpha: float, gamma: float) -> Tensor:
    """(Nq, G) focal cost: the focal loss of calling query q class labels[g], minus that of not calling it."""
    prob = logits.sigmoid()
    positive = -(prob + FOCAL_EPS).log() * alpha * (1 - prob).pow(gamma)
    negative = -(1 - prob + FOCAL_EPS).log() * (1 - alpha) * prob.pow(gamma)
    return (positive - negative)[:, labels]


def match_cost(
    logits: Tensor,
    boxes: Tensor,
    labels: Tensor,
    target_boxes: Tensor,
    image_size: tuple[int, int],
    costs: MatchCosts,
) -> Tensor:
    """(Nq, G) weighted cost of assigning each query (rows) to each ground truth (columns)."""
    classification = focal_cost(logits, labels, costs.alpha, costs.gamma)
    l1 = torch.cdist(boxes, target_boxes, p=1)
    scale = pixel_scale(image_size, boxes)
    giou = -generalized_box_iou(pixel_xyxy(boxes, scale), pixel_xyxy(target_boxes, scale))
    return classification * costs.focal + l1 * costs.l1 + giou * costs.giou


@torch.no_grad()
def hungarian_match(
    logits: Tensor,
    boxes: Tensor,
    labels: Tensor,
    target_boxes: Tensor,
    image_size: tuple[int, int],
    costs: MatchCosts,
) -> tuple[Tensor, Tensor]:
    """Query indexes and ground-truth indexes of the cheapest one-to-one assignment of one image.

    `logits` (Nq, C) are raw, `boxes` (Nq, 4) and `target_boxes` (G, 4) normalised (cx, cy, w, h), `labels`
    (G,) in 0..C-1 and `image_size` the unpadded (h, w). min(Nq, G) pairs come back, on the input device.
    """
    device = logits.device
    if logits.dim() != 2 or boxes.shape != (logits.shape[0], 4):
        raise ValueError(
            f"hungarian_match: expected logits (Nq, C) and boxes (Nq, 4), got {tuple(logits.shape)} and "
            f"{tuple(boxes.shape)}"
        )
    if target_boxes.shape != (labels.shape[0], 4):
        raise ValueError(
            f"hungarian_match: expected labels (G,) and target_boxes (G, 4), got {tuple(labels.shape)} and "
            f"{tuple(target_boxes.shape)}"
        )
    empty = torch.zeros(0, dtype=torch.long, device=device)
    if labels.numel() == 0 or logits.shape[0] == 0:
        return empty, empty.clone()
    cost = match_cost(
        logits.float(), boxes.float(), labels.to(device).long(), target_boxes.to(device).float(), image_size,
        costs,
    ).cpu()  # fmt: skip
    if not torch.isfinite(cost).all():
        raise ValueError(
            "hungarian_match: the matching cost is not finite; the predicted logits or boxes hold NaN/inf, "
            "or a target box has zero area"
        )
    rows, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(rows, dtype=torch.long, device=device), torch.as_tensor(
        cols, dtype=torch.long, device=device
    )
