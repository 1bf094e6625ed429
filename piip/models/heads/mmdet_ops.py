"""The box arithmetic of mmdet 2.x's `mask_rcnn_r50_fpn`, on torchvision's interfaces.

Released PIIP Mask R-CNN checkpoints were trained and evaluated with mmdet 2.x; a converted checkpoint gives
mmdet's detections only if every formula between the heads' outputs and the boxes is mmdet's. Each part here
subclasses (or replaces) the torchvision part that differs, and says how it differs:

- anchors: not rounded to whole pixels, strides fixed per level instead of inferred from the map size;
- box coder: centres as (x1 + x2) / 2, deltas divided by `stds`, log-size deltas clamped on both sides;
- matching: mmdet's `MaxIoUAssigner` (low-quality matches need `min_pos_iou` and go to the gt they are best
  for; IoU's union floored at 1e-6);
- RoI pooling: level = floor(log2(sqrt(area) / 56 + 1e-6)), `aligned=True` RoIAlign with adaptive sampling
  at stride 1 / level stride;
- NMS across classes or levels: mmcv's `batched_nms` (coordinate offsets, split per class from 10000 boxes);
- masks: targets are aligned RoIAligns of the gt masks binarised at 0.5; predictions are pasted with
  `grid_sample` (mmdet's `_do_paste_mask`) and binarised at `>= 0.5`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import MultiScaleRoIAlign, nms, roi_align

STRIDES = (4, 8, 16, 32, 64)  # the FPN levels "0".."3" and "pool"
FINEST_SCALE = 56  # mmdet's SingleRoIExtractor: RoIs below 2 x 56 pixels (sqrt of area) pool from stride 4
NMS_SPLIT = 10000  # mmcv's batched_nms runs one NMS per class from this many boxes on


class MMDetAnchorGenerator(AnchorGenerator):
    """mmdet's `AnchorGenerator` (centre offset 0, ratio-major order): sizes are not rounded, and each level
    has its configured stride (torchvision infers it by integer division, wrong for odd stride-64 maps)."""

    def __init__(
        self, sizes: Sequence[float], aspect_ratios: Sequence[float], strides: Sequence[int]
    ) -> None:
        super().__init__(tuple((s,) for s in sizes), (tuple(aspect_ratios),) * len(sizes))
        self.strides = list(strides)

    def generate_anchors(
        self,
        scales: list[int],
        aspect_ratios: list[float],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        sizes = torch.as_tensor(scales, dtype=dtype, device=device)
        h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=dtype, device=device))  # ratio = h / w
        ws = ((1 / h_ratios)[:, None] * sizes[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * sizes[None, :]).reshape(-1)
        return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=1)

    def forward(self, image_list: ImageList, feature_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """The same anchors (float32, whatever the maps' dtype) for every image of the batch."""
        device = feature_maps[0].device
        grid_sizes = [list(f.shape[-2:]) for f in feature_maps]
        strides = [[torch.tensor(s, device=device)] * 2 for s in self.strides[: len(feature_maps)]]
        self.set_cell_anchors(torch.float32, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in image_list.image_sizes]

    def valid_flags(
        self, grid_sizes: list[tuple[int, int]], pad_shape: tuple[int, int], device: torch.device
    ) -> torch.Tensor:
        """Anchors whose grid cell lies inside the image padded on its own (mmdet pads each image to the
        divisor before batching): the others take no part in RPN training."""
        flags = []
        for (height, width), stride, cell in zip(grid_sizes, self.strides, self.cell_anchors, strict=True):
            valid_h = min(math.ceil(pad_shape[0] / stride), height)
            valid_w = min(math.ceil(pad_shape[1] / stride), width)
            rows = torch.arange(height, device=device) < valid_h
            cols = torch.arange(width, device=device) < valid_w
            flags.append((rows[:, None] & cols[None, :]).reshape(-1, 1).expand(-1, len(cell)).reshape(-1))
        return torch.cat(flags)


class DeltaXYWHCoder(BoxCoder):
    """mmdet's `DeltaXYWHBBoxCoder` (means 0): deltas over (centre, size), divided by `stds`; decoding clamps
    the log-size deltas to +-log(1000 / 16). Always computed in float32."""

    def __init__(self, stds: Sequence[float], wh_ratio_clip: float = 16 / 1000) -> None:
        super().__init__(weights=tuple(1 / s for s in stds), bbox_xform_clip=abs(math.log(wh_ratio_clip)))
        self.stds = tuple(float(s) for s in stds)

    def encode_single(self, reference_boxes: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        """Deltas that move `proposals` onto `reference_boxes` (the matched gt)."""
        p, g = proposals.float(), reference_boxes.float()
        pw, ph = p[:, 2] - p[:, 0], p[:, 3] - p[:, 1]
        gw, gh = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
        dx = ((g[:, 0] + g[:, 2]) * 0.5 - (p[:, 0] + p[:, 2]) * 0.5) / pw
        dy = ((g[:, 1] + g[:, 3]) * 0.5 - (p[:, 1] + p[:, 3]) * 0.5) / ph
        deltas = torch.stack([dx, dy, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
        return deltas / deltas.new_tensor(self.stds)

    def decode_single(self, rel_codes: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """(N, K * 4) deltas on (N, 4) boxes -> (N, K * 4) boxes (not clipped)."""
        count, per_box = rel_codes.shape[0], rel_codes.shape[1] // 4
        deltas = rel_codes.float().reshape(-1, 4) * rel_codes.new_tensor(self.stds, dtype=torch.float32)
        rois = boxes.float().repeat(1, per_box).reshape(-1, 4)
        centres = (rois[:, :2] + rois[:, 2:]) * 0.5
        sizes = rois[:, 2:] - rois[:, :2]
        log_sizes = deltas[:, 2:].clamp(min=-self.bbox_xform_clip, max=self.bbox_xform_clip)
        new_centres = centres + sizes * deltas[:, :2]
        new_sizes = sizes * log_sizes.exp()
        decoded = torch.cat([new_centres - new_sizes * 0.5, new_centres + new_sizes * 0.5], dim=-1)
        return decoded.reshape(count, per_box * 4)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(N, M) IoU with mmdet's floor on the union (degenerate boxes give 0, not NaN)."""
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = torch.clamp(area1[:, None] + area2[None, :] - overlap, min=eps)
    return overlap / union


class MaxIoUMatcher(Matcher):
    """mmdet's `MaxIoUAssigner` in torchvision's `Matcher` output (-1 negative, -2 ignored, else gt index).

    torchvision's low-quality matching keeps each such prediction on its own best gt and has no floor;
    mmdet gives it to the gt whose best it is (the last such gt wins) when that IoU reaches `min_pos_iou`.
    """

    def __init__(self, pos_iou: float, neg_iou: float, min_pos_iou: float) -> None:
        super().__init__(pos_iou, neg_iou, allow_low_quality_matches=True)
        self.min_pos_iou = min_pos_iou

    def __call__(self, match_quality_matrix: torch.Tensor) -> torch.Tensor:
        iou = match_quality_matrix
        matches = torch.full((iou.shape[1],), self.BETWEEN_THRESHOLDS, dtype=torch.int64, device=iou.device)
        if iou.shape[1] == 0:
            return matches
        best, best_gt = iou.max(dim=0)
        matches[(best >= 0) & (best < self.low_threshold)] = self.BELOW_LOW_THRESHOLD
        positive = best >= self.high_threshold
        matches[positive] = best_gt[positive]
        gt_best = iou.max(dim=1).values
        hits = (iou == gt_best[:, None]) & (gt_best[:, None] >= self.min_pos_iou)
        last_gt = iou.shape[0] - 1 - hits.flip(0).to(torch.uint8).argmax(dim=0)
        hit = hits.any(dim=0)
        matches[hit] = last_gt[hit]
        return matches


def map_roi_levels(boxes: torch.Tensor, num_levels: int, finest_scale: float = FINEST_SCALE) -> torch.Tensor:
    """mmdet's RoI -> pyramid level: torchvision's LevelMapper puts its 1e-6 outside the log, which moves
    the boundaries (e.g. a 112 x 112 - 1e-4 box)."""
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


def rois_of(boxes: list[torch.Tensor]) -> torch.Tensor:
    """(K, 5) RoIs `[image index, x1, y1, x2, y2]` from per-image boxes."""
    indices = [torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)]
    return torch.cat([torch.cat(indices), torch.cat(boxes)], dim=1)


class MMDetRoIAlign(MultiScaleRoIAlign):
    """mmdet's `SingleRoIExtractor`: mmdet's level mapping and `aligned=True`, adaptive-sampling RoIAlign
    at the configured strides (torchvision: unaligned RoIAlign, 2 samples, scales guessed from sizes)."""

    def __init__(self, featmap_names: list[str], output_size: int, strides: Sequence[int]) -> None:
        super().__init__(featmap_names, output_size, sampling_ratio=0)
        self.strides = list(strides)

    def forward(
        self, x: dict[str, torch.Tensor], boxes: list[torch.Tensor], image_shapes: list[tuple[int, int]]
    ) -> torch.Tensor:
        features = [x[name] for name in self.featmap_names]
        rois = rois_of(boxes)
        levels = map_roi_levels(rois[:, 1:], len(features))
        result = features[0].new_zeros(len(rois), features[0].shape[1], *self.output_size)
        for level, (feature, stride) in enumerate(zip(features, self.strides, strict=True)):
            index = torch.where(levels == level)[0]
            if len(index):
                boxes_here = rois[index].to(feature.dtype)
                pooled = roi_align(feature, boxes_here, self.output_size, 1 / stride, 0, aligned=True)
                result[index] = pooled.to(result.dtype)
        return result


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Kept indices, best score first, NMS within each group as mmcv does it: boxes offset per group by
    (max coordinate + 1) in their own dtype, one NMS below `NMS_SPLIT` boxes, one per group above."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    offsets = groups.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    shifted = boxes + offsets[:, None]
    if len(boxes) < NMS_SPLIT:
        return nms(shifted, scores, iou_threshold)
    kept = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    for group in torch.unique(groups):
        members = torch.where(groups == group)[0]
        kept[members[nms(shifted[members], scores[members], iou_threshold)]] = True
    keep = torch.where(kept)[0]
    return keep[scores[keep].argsort(descending=True)]


def mask_targets(
    gt_masks: torch.Tensor,
    proposals: torch.Tensor,
    matched: torch.Tensor,
    size: int,
    pad_shape: tuple[int, int] | None = None,
) -> torch.Tensor:
    """(P, size, size) 0/1 targets: the matched gt mask under each proposal, by an aligned, adaptive
    RoIAlign, binarised at 0.5 (torchvision: unaligned RoIAlign, soft targets). mmdet's masks are padded
    with zeros to their image's `pad_shape` (samples in the last half pixel see the zeros), and the
    proposals are clipped to it."""
    if len(proposals) == 0:
        return proposals.new_zeros(0, size, size)
    used, index = matched.unique(return_inverse=True)  # only the matched masks, as floats
    masks = gt_masks[used][:, None].float()
    height, width = pad_shape or masks.shape[-2:]
    # RoIAlign clamps at the last row and column: one zero row and column read as any larger padding
    extra_w, extra_h = min(width - masks.shape[-1], 1), min(height - masks.shape[-2], 1)
    masks = F.pad(masks, (0, extra_w, 0, extra_h))
    boxes = proposals.float().clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(min=0, max=width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(min=0, max=height)
    rois = torch.cat([index[:, None].to(boxes), boxes], dim=1)
    resized = roi_align(masks, rois, (size, size), 1.0, 0, True)[:, 0]
    return (resized >= 0.5).to(boxes)


def paste_masks(
    masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int, threshold: float = 0.5
) -> torch.Tensor:
    """(N, 1, h, w) probabilities at (N, 4) boxes -> (N, 1, height, width) 0/1 masks, mmdet's way.

    mmdet on GPU resamples each mask with `grid_sample` at every pixel centre of the image. Outside a box
    the mask's bilinear weight is below one half, so only the box's region (one pixel of margin) is
    computed here, with the same binary result. A box of zero width (height) maps every column (row) to
    the mask's middle, over the whole image: there the region is the whole image, as on GPU (mmdet on CPU
    keeps the margin region and differs)."""
    pasted = masks.new_zeros(len(masks), 1, height, width, dtype=torch.float32)
    boxes = boxes.float()
    for index, (left, top, right, bottom) in enumerate(boxes.tolist()):  # one device sync
        x0, x1 = _span(left, right, width)
        y0, y1 = _span(top, bottom, height)
        if x1 <= x0 or y1 <= y0:
            continue
        bx0, by0, bx1, by1 = boxes[index : index + 1].split(1, dim=1)
        ys = torch.arange(y0, y1, device=masks.device).to(torch.float32) + 0.5
        xs = torch.arange(x0, x1, device=masks.device).to(torch.float32) + 0.5
        ys = (ys - by0) / (by1 - by0) * 2 - 1  # the box spans [-1, 1] in grid_sample's coordinates
        xs = (xs - bx0) / (bx1 - bx0) * 2 - 1
        ys[torch.isinf(ys)] = 0  # a zero-height box: every row samples the mask's middle row
        xs[torch.isinf(xs)] = 0
        shape = (1, ys.shape[1], xs.shape[1])
        grid = torch.stack([xs[:, None, :].expand(shape), ys[:, :, None].expand(shape)], dim=3)
        sampled = F.grid_sample(masks[index : index + 1].float(), grid, align_corners=False)
        pasted[index, 0, y0:y1, x0:x1] = (sampled[0, 0] >= threshold).float()
    return pasted


def _span(low: float, high: float, size: int) -> tuple[int, int]:
    """Pixel range a box side covers in `paste_masks`: one pixel of margin, or all if it has no extent."""
    if high == low:
        return 0, size
    return max(math.floor(low) - 1, 0), min(math.ceil(high) + 1, size)
