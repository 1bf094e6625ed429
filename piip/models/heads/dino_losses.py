"""DINO's training losses as mmdet 2.x's `DINOHead.loss` computes them, under mmdet's names.

Every decoder layer, and the encoder's top-K proposals (`interm_*`, a multi-class loss as in DINO rather than
Deformable DETR's binary one), is matched to the ground truths on its own (`dino_matching`) and scored with
- a sigmoid focal loss against one-hot targets (unmatched queries: all zeros), summed over queries, classes;
- an L1 loss between the normalised (cx, cy, w, h) boxes of the matched pairs;
- a GIoU loss (1 - GIoU) between the same pairs as pixel corners of each image's unpadded size.
Each is divided by the number of positives averaged over the processes (`sync_cls_avg_factor=True` in every
released config), at least 1, and multiplied by its weight. Denoising queries (`dino_denoising`) need no
matching: positive slot j of each group is ground truth j, the negative and padding slots are background
and carry no box loss (`dn_*`, every layer).

mmdet divides by `avg_factor + eps(float32)`, which is kept; its GIoU floors the union and the enclosing area
at 1e-6 where torchvision's `generalized_box_iou_loss` adds an eps, which only matters for degenerate boxes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from piip.models.heads.dino_denoising import Denoising, split_outputs
from piip.models.heads.dino_matching import MatchCosts, hungarian_match, pixel_scale, pixel_xyxy

AVG_EPS = torch.finfo(torch.float32).eps  # mmdet's weight_reduce_loss: loss.sum() / (avg_factor + eps)
GIOU_EPS = 1e-6  # mmdet's GIoULoss eps


@dataclass
class LossWeights:
    """Weights of the three losses (`loss_cls`, `loss_bbox`, `loss_iou`) and the focal loss's alpha/gamma."""

    focal: float = 1.0
    l1: float = 5.0
    giou: float = 2.0
    alpha: float = 0.25
    gamma: float = 2.0


def mean_over_processes(value: float, device: torch.device | str) -> float:
    """The mean of `value` over the torch.distributed ranks (mmdet's `reduce_mean` of the avg factors), so
    that every rank divides by the same number; `value` itself outside distributed runs."""
    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    total = torch.tensor([float(value)], dtype=torch.float32, device=device)
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


@dataclass
class _Assigned:
    """The targets of one layer: one-hot classes for every query, and the matched (prediction, target) boxes
    with each pair's [w, h, w, h] pixel scale."""

    classes: Tensor
    predicted: Tensor
    target: Tensor
    scale: Tensor

    @property
    def num_positive(self) -> int:
        return self.predicted.shape[0]


class DINOCriterion(nn.Module):
    """All of DINO's losses for one batch: matched decoder layers, encoder proposals and denoising queries."""

    def __init__(self, num_classes: int, costs: MatchCosts | None = None, weights: LossWeights | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.costs = costs if costs is not None else MatchCosts()
        self.weights = weights if weights is not None else LossWeights()

    def forward(
        self,
        logits: Tensor,
        boxes: Tensor,
        enc_logits: Tensor,
        enc_boxes: Tensor,
        targets: list[dict[str, Any]],
        denoising: Denoising | None = None,
    ) -> dict[str, Tensor]:
        """`logits` (layers, B, pad + Nq, C) raw and `boxes` (layers, B, pad + Nq, 4) sigmoid (cx, cy, w, h)
        normalised by each image's unpadded size; `enc_logits` (B, K, C) and `enc_boxes` (B, K, 4) the
        encoder's top-K proposals; per image `labels` (G,), `boxes` (G, 4) normalised (cx, cy, w, h) and
        `size` (h, w). Computed in float32 (upstream's `force_fp32`)."""
        self._check(logits, boxes, enc_logits, enc_boxes, targets)
        logits, boxes = logits.float(), boxes.float()
        enc_logits, enc_boxes = enc_logits.float(), enc_boxes.float()
        pad = denoising.pad if denoising is not None else 0
        if logits.shape[2] <= pad:
            raise ValueError(
                f"DINOCriterion: {logits.shape[2]} queries per image but {pad} of them are denoising queries"
            )
        dn_logits, logits = split_outputs(logits, pad)
        dn_boxes, boxes = split_outputs(boxes, pad)
        targets = [self._on_device(target, logits.device) for target in targets]

        losses: dict[str, Tensor] = {}
        encoder = self._matched(enc_logits, enc_boxes, targets)
        losses.update(self._named("interm_loss", self._losses(enc_logits, encoder)))
        layers = logits.shape[0]
        per_layer = [
            self._losses(logits[i], self._matched(logits[i], boxes[i], targets)) for i in range(layers)
        ]
        losses.update(self._named("loss", per_layer[-1]))
        for i, layer in enumerate(per_layer[:-1]):
            losses.update(self._named(f"d{i}.loss", layer))
        if denoising is not None:
            classes, slots, target, scale = self._denoised(dn_boxes, targets, denoising)
            per_layer = [
                self._losses(
                    dn_logits[i], _Assigned(classes, dn_boxes[i].reshape(-1, 4)[slots], target, scale)
                )
                for i in range(layers)
            ]
            losses.update(self._named("dn_loss", per_layer[-1]))
            for i, layer in enumerate(per_layer[:-1]):
                losses.update(self._named(f"d{i}.dn_loss", layer))
        return losses

    @staticmethod
    def _named(prefix: str, values: tuple[Tensor, Tensor, Tensor]) -> dict[str, Tensor]:
        return dict(zip((f"{prefix}_cls", f"{prefix}_bbox", f"{prefix}_iou"), values, strict=True))

    def _check(
        self,
        logits: Tensor,
        boxes: Tensor,
        enc_logits: Tensor,
        enc_boxes: Tensor,
        targets: list[dict[str, Any]],
    ) -> None:
        if logits.dim() != 4 or logits.shape[-1] != self.num_classes or boxes.shape != (*logits.shape[:3], 4):
            raise ValueError(
                f"DINOCriterion: expected logits (layers, B, queries, {self.num_classes}) and boxes "
                f"(layers, B, queries, 4), got {tuple(logits.shape)} and {tuple(boxes.shape)}"
            )
        batch = logits.shape[1]
        if enc_logits.shape[:1] != (batch,) or enc_logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"DINOCriterion: expected enc_logits ({batch}, K, {self.num_classes}), "
                f"got {tuple(enc_logits.shape)}"
            )
        if enc_boxes.shape != (*enc_logits.shape[:2], 4):
            raise ValueError(
                f"DINOCriterion: expected enc_boxes ({batch}, {enc_logits.shape[1]}, 4), "
                f"got {tuple(enc_boxes.shape)}"
            )
        if len(targets) != batch:
            raise ValueError(f"DINOCriterion: {len(targets)} targets for a batch of {batch} images")

    @staticmethod
    def _on_device(target: dict[str, Any], device: torch.device) -> dict[str, Any]:
        height, width = (int(side) for side in target["size"])
        return {
            "labels": target["labels"].to(device).long(),
            "boxes": target["boxes"].to(device).float(),
            "size": (height, width),
        }

    def _matched(self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Any]]) -> _Assigned:
        """Hungarian targets of one layer; `logits` (B, N, C), `boxes` (B, N, 4)."""
        classes = torch.zeros_like(logits)
        predicted, matched, scales = [], [], []
        for image, target in enumerate(targets):
            queries, gts = hungarian_match(
                logits[image], boxes[image], target["labels"], target["boxes"], target["size"], self.costs
            )
            classes[image, queries, target["labels"][gts]] = 1.0
            predicted.append(boxes[image, queries])
            matched.append(target["boxes"][gts])
            scales.append(pixel_scale(target["size"], boxes).expand(len(queries), 4))
        return _Assigned(classes, torch.cat(predicted), torch.cat(matched), torch.cat(scales))

    def _denoised(
        self, boxes: Tensor, targets: list[dict[str, Any]], denoising: Denoising
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The fixed denoising targets of every layer: one-hot classes (B, pad, C), the positive slots as
        indexes into the flattened (B * pad) outputs, their target boxes and pixel scales."""
        batch, pad = boxes.shape[1:3]
        if pad != denoising.pad:
            raise ValueError(f"DINOCriterion: {pad} denoising outputs for pad {denoising.pad}")
        classes = boxes.new_zeros(batch, pad, self.num_classes)
        slots_per_image, matched, scales = [], [], []
        groups = torch.arange(denoising.num_groups, device=boxes.device)[:, None] * denoising.group_size
        for image, target in enumerate(targets):
            count = len(target["labels"])
            if count > denoising.group_size // 2:
                raise ValueError(
                    f"DINOCriterion: image {image} has {count} ground truths but the denoising groups were "
                    f"made for at most {denoising.group_size // 2}"
                )
            gts = torch.arange(count, device=boxes.device)
            slots = (groups + gts[None]).flatten()  # group g, slot j: ground truth j
            gts = gts.repeat(denoising.num_groups)
            classes[image, slots, target["labels"][gts]] = 1.0
            slots_per_image.append(slots + image * pad)
            matched.append(target["boxes"][gts])
            scales.append(pixel_scale(target["size"], boxes).expand(len(slots), 4))
        return classes, torch.cat(slots_per_image), torch.cat(matched), torch.cat(scales)

    def _losses(self, logits: Tensor, assigned: _Assigned) -> tuple[Tensor, Tensor, Tensor]:
        """(focal, L1, GIoU) of one layer, each divided by the positives averaged over processes."""
        w = self.weights
        avg_factor = max(mean_over_processes(assigned.num_positive, logits.device), 1.0) + AVG_EPS
        focal = sigmoid_focal_loss(logits, assigned.classes, alpha=w.alpha, gamma=w.gamma, reduction="sum")
        predicted, target = assigned.predicted, assigned.target
        if assigned.num_positive == 0:  # zero, but still a function of the boxes
            l1 = giou = predicted.sum() * 0.0
        else:
            l1 = (predicted - target).abs().sum()
            giou = generalized_box_iou_loss(
                pixel_xyxy(predicted, assigned.scale),
                pixel_xyxy(target, assigned.scale),
                reduction="sum",
                eps=GIOU_EPS,
            )
        return focal * w.focal / avg_factor, l1 * w.l1 / avg_factor, giou * w.giou / avg_factor
