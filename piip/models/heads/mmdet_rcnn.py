"""mmdet 2.x's RPN and RoI heads on torchvision's classes: same modules and parameter names, mmdet's
proposals, losses and detections (the formulas are in `piip.models.heads.mmdet_ops`).

Class order stays torchvision's (background first, 4 box outputs and a mask channel for it); a converted
mmdet checkpoint has its rows permuted (`piip.models.convert.mmdet_rcnn`), which changes no softmax,
no selected box delta and no selected mask.

What differs from torchvision, besides the formulas:
- RPN: each level's best `pre_nms_top_n` scores (sigmoid) are decoded, clipped, boxes with a side <= 0
  dropped (torchvision: < 1e-3), then one mmcv NMS over the levels; training ignores anchors outside the
  image padded on its own (mmdet's valid flags); losses are summed and divided by the sampled count + eps,
  the box loss is L1 (torchvision: smooth-L1 with beta 1/9);
- RoI heads: the proposals are assigned without the gt boxes, which then count as proposals of their own
  gt; L1 box loss; mask targets binarised (gt masks zero-padded like the image); at test time the softmax
  runs over mmdet's column order (bit-identical scores), boxes are rescaled to the stored image size
  *before* the class-wise NMS (no small-box filter), masks are cut from the features at the rescaled boxes
  scaled back, pasted with `grid_sample` at the stored size and binarised (`>= 0.5`), as mmdet does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers
from torchvision.ops.boxes import clip_boxes_to_image

from piip.models.heads.mmdet_ops import (
    DeltaXYWHCoder,
    MaxIoUMatcher,
    MMDetAnchorGenerator,
    batched_nms,
    box_iou,
    mask_targets,
    paste_masks,
)

EPS = torch.finfo(torch.float32).eps  # mmdet divides summed losses by (count + eps)
RPN_STDS = (1.0, 1.0, 1.0, 1.0)
RCNN_STDS = (0.1, 0.1, 0.2, 0.2)


class MMDetRPN(RegionProposalNetwork):
    """mmdet's `RPNHead` test and training behaviour around torchvision's `RPNHead` module."""

    anchor_generator: MMDetAnchorGenerator

    def __init__(
        self,
        anchor_generator: MMDetAnchorGenerator,
        head: nn.Module,
        *,
        batch_size_per_image: int,
        positive_fraction: float,
        pre_nms_top_n: dict[str, int],
        post_nms_top_n: dict[str, int],
        nms_thresh: float,
        size_divisible: int,
        min_bbox_size: float = 0.0,
    ) -> None:
        super().__init__(
            anchor_generator, head, 0.7, 0.3, batch_size_per_image, positive_fraction,
            pre_nms_top_n, post_nms_top_n, nms_thresh,
        )  # fmt: skip
        self.box_coder = DeltaXYWHCoder(RPN_STDS)
        self.proposal_matcher = MaxIoUMatcher(0.7, 0.3, min_pos_iou=0.3)
        self.box_similarity = box_iou
        self.size_divisible = size_divisible
        self.min_size = min_bbox_size

    def forward(
        self,
        images: ImageList,
        features: dict[str, torch.Tensor],
        targets: list[dict[str, torch.Tensor]] | None = None,
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        maps = list(features.values())
        objectness, deltas = self.head(maps)
        anchors = self.anchor_generator(images, maps)
        grid_sizes = [(int(o.shape[-2]), int(o.shape[-1])) for o in objectness]
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        objectness = objectness.float().reshape(len(anchors), -1)
        deltas = deltas.float().reshape(len(anchors), -1, 4)
        proposals = [
            self.propose(scores, codes, anchors_of_image, size, per_level)
            for scores, codes, anchors_of_image, size in zip(
                objectness.detach(), deltas.detach(), anchors, images.image_sizes, strict=True
            )
        ]
        if not self.training:
            return proposals, {}
        if targets is None:
            raise ValueError("the RPN needs targets in training mode")
        valid = [
            self.anchor_generator.valid_flags(grid_sizes, self.pad_shape(size), objectness.device)
            for size in images.image_sizes
        ]
        labels, matched = self.assign(anchors, targets, valid)
        regression_targets = self.box_coder.encode(matched, anchors)
        loss_objectness, loss_box = self.compute_loss(objectness, deltas, labels, list(regression_targets))
        return proposals, {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_box}

    def pad_shape(self, size: tuple[int, int]) -> tuple[int, int]:
        """The image padded on its own to the divisor, as mmdet's `Pad` leaves it before batching."""
        d = self.size_divisible
        return math.ceil(size[0] / d) * d, math.ceil(size[1] / d) * d

    def propose(
        self,
        logits: torch.Tensor,
        deltas: torch.Tensor,
        anchors: torch.Tensor,
        image_size: tuple[int, int],
        per_level: list[int],
    ) -> torch.Tensor:
        """One image's proposals, best first (mmdet's `RPNHead._get_bboxes_single`)."""
        scores, picked, levels = [], [], []
        start, top_n = 0, self.pre_nms_top_n()
        for level, count in enumerate(per_level):
            level_scores = logits[start : start + count].sigmoid()
            index = torch.arange(start, start + count, device=logits.device)
            if 0 < top_n < count:
                level_scores, order = level_scores.sort(descending=True)
                level_scores, index = level_scores[:top_n], index[order[:top_n]]
            scores.append(level_scores)
            picked.append(index)
            levels.append(torch.full_like(index, level))
            start += count
        index = torch.cat(picked)
        score, level = torch.cat(scores), torch.cat(levels)
        boxes = clip_boxes_to_image(self.box_coder.decode_single(deltas[index], anchors[index]), image_size)
        wide = boxes[:, 2] - boxes[:, 0] > self.min_size
        high = boxes[:, 3] - boxes[:, 1] > self.min_size
        keep = wide & high
        boxes, score, level = boxes[keep], score[keep], level[keep]
        return boxes[batched_nms(boxes, score, level, self.nms_thresh)[: self.post_nms_top_n()]]

    def assign(
        self, anchors: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], valid: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per anchor: label 1 / 0 / -1 (ignored, also every invalid anchor) and the matched gt box."""
        labels, matched = [], []
        for anchors_of_image, target, inside in zip(anchors, targets, valid, strict=True):
            gt = target["boxes"].float()
            label = anchors_of_image.new_full((len(anchors_of_image),), -1.0)
            boxes = anchors_of_image.clone()  # unmatched anchors encode to zero deltas (never used)
            if len(gt) == 0:
                label[inside] = 0.0
            else:
                match = self.proposal_matcher(box_iou(gt, anchors_of_image[inside]))
                part = (match >= 0).float()
                part[match == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1.0
                label[inside] = part
                positive = torch.where(inside)[0][match >= 0]
                boxes[positive] = gt[match[match >= 0]]
            labels.append(label)
            matched.append(boxes)
        return labels, matched

    def compute_loss(
        self,
        objectness: torch.Tensor,
        pred_bbox_deltas: torch.Tensor,
        labels: list[torch.Tensor],
        regression_targets: list[torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Binary cross-entropy and L1 summed over the sampled anchors / (their count + eps)."""
        positive, negative = self.fg_bg_sampler(labels)
        positive = torch.where(torch.cat(positive))[0]
        sampled = torch.cat([positive, torch.where(torch.cat(negative))[0]])
        count = sampled.numel() + EPS
        logits, targets = objectness.reshape(-1), torch.cat(labels)
        loss_objectness = (
            F.binary_cross_entropy_with_logits(logits[sampled], targets[sampled], reduction="sum") / count
        )
        deltas, encoded = pred_bbox_deltas.reshape(-1, 4), torch.cat(regression_targets)
        loss_box = F.l1_loss(deltas[positive], encoded[positive], reduction="sum") / count
        return loss_objectness, loss_box


class MMDetRoIHeads(RoIHeads):
    """mmdet's `StandardRoIHead` (Shared2FC box head, FCN mask head) around torchvision's modules."""

    def __init__(self, *args: Any, size_divisible: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.box_coder = DeltaXYWHCoder(RCNN_STDS)
        self.proposal_matcher = MaxIoUMatcher(0.5, 0.5, min_pos_iou=0.5)
        self.size_divisible = size_divisible  # mmdet pads gt masks with the image: mask targets see zeros

    def assign_targets_to_proposals(
        self, proposals: list[torch.Tensor], gt_boxes: list[torch.Tensor], gt_labels: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        matched_idxs, labels = [], []
        for boxes, gt, gt_label in zip(proposals, gt_boxes, gt_labels, strict=True):
            if gt.numel() == 0:
                matched_idxs.append(torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device))
                labels.append(torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device))
                continue
            # mmdet assigns the proposals alone, then adds each gt box as a proposal of its own gt
            # (torchvision's `add_gt_proposals` appended them last)
            count = len(boxes) - len(gt)
            own = torch.arange(len(gt), device=boxes.device)
            match = torch.cat([self.proposal_matcher(box_iou(gt, boxes[:count])), own])
            label = gt_label[match.clamp(min=0)].to(torch.int64)
            label[match == self.proposal_matcher.BELOW_LOW_THRESHOLD] = 0
            label[match == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1
            matched_idxs.append(match.clamp(min=0))
            labels.append(label)
        return matched_idxs, labels

    def forward(  # type: ignore[override]
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, torch.Tensor]] | None = None,
        original_sizes: list[tuple[int, int]] | None = None,
    ) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """Losses in training; otherwise detections at `original_sizes` (default: `image_shapes`)."""
        if not self.training:
            return self.detect(features, proposals, image_shapes, original_sizes or image_shapes), {}
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        class_logits, box_regression = self.box_predictor(
            self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        )
        losses = self.box_loss(class_logits, box_regression, labels, list(regression_targets))
        if self.has_mask():
            positive = [torch.where(label > 0)[0] for label in labels]
            boxes = [p[i] for p, i in zip(proposals, positive, strict=True)]
            logits = self.mask_logits(features, boxes, image_shapes)
            wanted = [
                mask_targets(t["masks"], b, m[i], logits.shape[-1], self.pad_shape(shape))
                for t, b, m, i, shape in zip(
                    targets, boxes, matched_idxs, positive, image_shapes, strict=True
                )
            ]
            chosen = torch.cat([label[i] for label, i in zip(labels, positive, strict=True)])
            losses["loss_mask"] = self.mask_loss(logits, torch.cat(wanted), chosen)
        return [], losses

    def pad_shape(self, size: tuple[int, int]) -> tuple[int, int]:
        d = self.size_divisible
        return math.ceil(size[0] / d) * d, math.ceil(size[1] / d) * d

    def box_loss(
        self,
        class_logits: torch.Tensor,
        box_regression: torch.Tensor,
        labels: list[torch.Tensor],
        regression_targets: list[torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Cross-entropy over the sampled RoIs; L1 on the positives' own-class deltas; both / (RoIs + eps)."""
        label, encoded = torch.cat(labels), torch.cat(regression_targets)
        count = label.numel() + EPS
        loss_classifier = F.cross_entropy(class_logits.float(), label, reduction="sum") / count
        positive = torch.where(label > 0)[0]
        deltas = box_regression.float().reshape(len(label), -1, 4)[positive, label[positive]]
        loss_box = F.l1_loss(deltas, encoded[positive], reduction="sum") / count
        return {"loss_classifier": loss_classifier, "loss_box_reg": loss_box}

    @staticmethod
    def mask_loss(logits: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean binary cross-entropy of each positive RoI's own-class mask against its binary target."""
        if targets.numel() == 0:
            return logits.sum() * 0
        chosen = logits.float()[torch.arange(len(labels), device=labels.device), labels]
        return F.binary_cross_entropy_with_logits(chosen, targets)

    def mask_logits(
        self,
        features: dict[str, torch.Tensor],
        boxes: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        return self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))

    def detect(
        self,
        features: dict[str, torch.Tensor],
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
    ) -> list[dict[str, torch.Tensor]]:
        """mmdet's `simple_test` with `rescale=True`: boxes, labels (1..K), scores, 0/1 masks (N, 1, H, W)."""
        class_logits, box_regression = self.box_predictor(
            self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        )
        results = self.boxes_at(class_logits, box_regression, proposals, image_shapes, original_sizes)
        if self.has_mask():
            self.add_masks(features, results, image_shapes, original_sizes)
        return results

    def boxes_at(
        self,
        class_logits: torch.Tensor,
        box_regression: torch.Tensor,
        proposals: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
    ) -> list[dict[str, torch.Tensor]]:
        """mmdet's `BBoxHead.get_bboxes`: decode, clip to the resized image, rescale, `class_nms`."""
        counts = [len(p) for p in proposals]
        num_classes = class_logits.shape[-1]
        # softmax over mmdet's column order (background last): the same sum, so bit-identical scores and
        # the same order among near-ties in the NMS
        scores = F.softmax(class_logits.float().roll(-1, dims=1), dim=-1).roll(1, dims=1).split(counts)
        decoded = self.box_coder.decode_single(box_regression.float(), torch.cat(proposals))
        boxes = decoded.reshape(len(decoded), num_classes, 4).split(counts)
        results = []
        for image_boxes, image_scores, shape, original in zip(
            boxes, scores, image_shapes, original_sizes, strict=True
        ):
            rescaled = clip_boxes_to_image(image_boxes, shape) / scale_factor(shape, original, image_boxes)
            results.append(self.class_nms(rescaled[:, 1:], image_scores[:, 1:]))
        return results

    def class_nms(self, boxes: torch.Tensor, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        """mmdet's `multiclass_nms`: scores above the threshold (strictly), NMS per class, the best N."""
        classes = torch.arange(scores.shape[1], device=scores.device).repeat(len(scores))
        boxes, scores = boxes.reshape(-1, 4), scores.reshape(-1)
        keep = scores > self.score_thresh
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        keep = batched_nms(boxes, scores, classes, self.nms_thresh)[: self.detections_per_img]
        return {"boxes": boxes[keep], "labels": classes[keep] + 1, "scores": scores[keep]}

    def add_masks(
        self,
        features: dict[str, torch.Tensor],
        results: list[dict[str, torch.Tensor]],
        image_shapes: list[tuple[int, int]],
        original_sizes: list[tuple[int, int]],
    ) -> None:
        """Masks cut at the detections in the resized frame, pasted in the stored frame."""
        sizes = zip(image_shapes, original_sizes, results, strict=True)
        scales = [scale_factor(shape, original, result["boxes"]) for shape, original, result in sizes]
        boxes = [r["boxes"] * scale for r, scale in zip(results, scales, strict=True)]
        counts = [len(b) for b in boxes]
        if sum(counts):
            logits = self.mask_logits(features, boxes, image_shapes)
            labels = torch.cat([r["labels"] for r in results])
            rows = torch.arange(len(labels), device=labels.device)
            probabilities = logits.float().sigmoid()[rows, labels][:, None].split(counts)
        else:
            probabilities = [b.new_zeros(0, 1, 1, 1) for b in boxes]
        for result, image_boxes, scale, chance, (height, width) in zip(
            results, boxes, scales, probabilities, original_sizes, strict=True
        ):
            result["masks"] = paste_masks(chance, image_boxes / scale, int(height), int(width))


def scale_factor(shape: tuple[int, int], original: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """mmdet's `scale_factor` (w, h, w, h) in float32: resized size / stored size."""
    return torch.tensor(
        [shape[1] / original[1], shape[0] / original[0]] * 2, dtype=torch.float32, device=like.device
    )
