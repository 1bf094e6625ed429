"""Mask R-CNN after the backbone, from torchvision parts: FPN neck, RPN and RoI heads (PAPER.md §1.7, §3.3).

The defaults are mmdet 2.x `mask_rcnn_r50_fpn` 1x, which every released PIIP detection config uses, and
`flavour: mmdet` (the default) computes what mmdet computes, so a converted mmdet checkpoint gives mmdet's
detections: unrounded anchors, mmdet's box coder, assigner, RoI level mapping and aligned RoIAlign, L1 box
losses, binary mask targets, rescaling before the class-wise NMS and `grid_sample` mask pasting
(`piip.models.heads.mmdet_rcnn`), and mmdet's initialisation of the FPN and box head. The modules and
parameter names are torchvision's in both flavours (background is class 0; the converter permutes mmdet's
rows). `flavour: torchvision` keeps torchvision's own behaviour (rounded anchors, smooth-L1, RoIAlign with 2
samples, `paste_masks_in_image`).

The backbone is referenced, not registered (`piip.models.heads.detector`): the task owns one copy of it
under one name for every task (layer-wise lr decay and checkpoint conversion see `backbone.*`).

Images arrive already resized (by the data pipeline, as in mmdet); `ImageBatcher` only normalises and pads
them to a common size divisible by `size_divisible`, and predictions come back at the stored image size
(`orig_size` of each target) so they can be evaluated against the annotation file.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from piip.errors import ConfigError
from piip.models.checks import number_in
from piip.models.convert.mmdet_rcnn import convert_mask_rcnn
from piip.models.heads.detector import Detector, stored_sizes
from piip.models.heads.mmdet_ops import STRIDES, MMDetAnchorGenerator, MMDetRoIAlign
from piip.models.heads.mmdet_rcnn import MMDetRoIHeads, MMDetRPN

LEVELS = ("0", "1", "2", "3")  # strides 4, 8, 16, 32; the FPN adds "pool" (stride 64)
FLAVOURS = ("mmdet", "torchvision")


@dataclass
class MaskRCNNConfig:
    """`task.module.detector` in the configs; image statistics are in 0–255 pixel units."""

    fpn_channels: int = 256
    image_mean: list[float] = field(default_factory=lambda: [127.5, 127.5, 127.5])
    image_std: list[float] = field(default_factory=lambda: [127.5, 127.5, 127.5])
    size_divisible: int = 32
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])  # one per level
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_pre_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_train: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_nms_thresh: float = 0.7
    rpn_batch_size_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    box_batch_size_per_image: int = 512
    box_positive_fraction: float = 0.25
    box_head_dim: int = 1024
    mask_head_channels: int = 256
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    box_detections_per_img: int = 100
    flavour: str = "mmdet"  # mmdet 2.x's formulas and losses, or torchvision's own (see the module doc)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> MaskRCNNConfig:
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"task.module.detector: unknown field(s) {unknown}; expected some of {sorted(known)}"
            )
        config = cls(**data)
        if len(config.anchor_sizes) != len(LEVELS) + 1:
            raise ConfigError(
                f"task.module.detector.anchor_sizes: expected {len(LEVELS) + 1} sizes (levels stride 4-64), "
                f"got {config.anchor_sizes}"
            )
        for name in ("box_score_thresh", "box_nms_thresh", "rpn_nms_thresh"):
            number_in(getattr(config, name), f"task.module.detector.{name}", 0, 1)
        if config.flavour not in FLAVOURS:
            raise ConfigError(
                f"task.module.detector.flavour: expected one of {list(FLAVOURS)}, got {config.flavour!r}"
            )
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ImageBatcher(GeneralizedRCNNTransform):
    """torchvision's detection transform without its resize: normalise, pad, remember each image's size."""

    def __init__(self, mean: list[float], std: list[float], size_divisible: int) -> None:
        super().__init__(
            min_size=1, max_size=1, image_mean=mean, image_std=std, size_divisible=size_divisible
        )

    def resize(
        self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        return image, target


class PyramidNeck(nn.Module):
    """torchvision's FPN over the backbone's 4-level pyramid, plus the stride-64 max-pool level."""

    def __init__(self, in_channels: list[int], out_channels: int) -> None:
        super().__init__()
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, pyramid: list[torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict(zip(LEVELS, pyramid, strict=True)))


class MaskRCNN(Detector):
    """Mask R-CNN on a backbone with a 4-level pyramid; `num_classes` excludes the background."""

    name = "mask_rcnn"

    def __init__(self, backbone: nn.Module, num_classes: int, config: MaskRCNNConfig) -> None:
        super().__init__(backbone)
        if backbone.pyramid.strides != [4, 8, 16, 32]:
            raise ConfigError(
                f"task.backbone.pyramid_strides: Mask R-CNN reads strides [4, 8, 16, 32], the backbone gives "
                f"{backbone.pyramid.strides}"
            )
        check_size_divisible(backbone, config.size_divisible)
        self.config = config
        c = config
        self.batcher = ImageBatcher(c.image_mean, c.image_std, c.size_divisible)
        self.neck = PyramidNeck(backbone.pyramid.out_channels, c.fpn_channels)
        self.mmdet = c.flavour == "mmdet"
        self.rpn = (mmdet_rpn if self.mmdet else torchvision_rpn)(c)
        self.roi_heads = (MMDetRoIHeads if self.mmdet else RoIHeads)(
            box_roi_pool=roi_pool(7, self.mmdet),
            box_head=TwoMLPHead(c.fpn_channels * 7 * 7, c.box_head_dim),
            box_predictor=FastRCNNPredictor(c.box_head_dim, num_classes + 1),
            fg_iou_thresh=0.5,
            bg_iou_thresh=0.5,
            batch_size_per_image=c.box_batch_size_per_image,
            positive_fraction=c.box_positive_fraction,
            bbox_reg_weights=None,
            score_thresh=c.box_score_thresh,
            nms_thresh=c.box_nms_thresh,
            detections_per_img=c.box_detections_per_img,
            mask_roi_pool=roi_pool(14, self.mmdet),
            mask_head=MaskRCNNHeads(c.fpn_channels, [c.mask_head_channels] * 4, dilation=1),
            mask_predictor=MaskRCNNPredictor(c.mask_head_channels, c.mask_head_channels, num_classes + 1),
            **({"size_divisible": c.size_divisible} if self.mmdet else {}),
        )
        if self.mmdet:
            init_like_mmdet(self)

    @classmethod
    def from_config(cls, backbone: nn.Module, num_classes: int, config: dict[str, Any]) -> MaskRCNN:
        return cls(backbone, num_classes, MaskRCNNConfig.from_dict(config))

    def forward(
        self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Losses in training; in eval, detections at each target's `orig_size` (else the input size).

        `images` are float 0–255 tensors of any sizes; the backbone sees them normalised and padded.
        """
        if self.training and targets is None:
            raise ValueError("Mask R-CNN needs targets in training mode")
        original = stored_sizes(images, targets)
        targets = targets if self.training else None  # in evaluation they only carry orig_size
        batch, targets = self.batcher(images, targets)
        features = self.neck(self.backbone(batch.tensors).pyramid)
        proposals, rpn_losses = self.rpn(batch, features, targets)
        sizes = [tuple(s) for s in original]
        if self.mmdet:  # detections come back at `sizes` already
            detections, roi_losses = self.roi_heads(features, proposals, batch.image_sizes, targets, sizes)
        else:
            detections, roi_losses = self.roi_heads(features, proposals, batch.image_sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        return detections if self.mmdet else self.batcher.postprocess(detections, batch.image_sizes, sizes)

    def from_official(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
        """mmdet 2.x's head names (`neck.`, `rpn_head.`, `roi_head.`) -> `detector.*`, classes reordered; the
        detections are mmdet's with `flavour: mmdet` only."""
        return convert_mask_rcnn(state)

    def pad(self, images: list[torch.Tensor]) -> ImageList:
        """The normalised, padded batch the backbone sees (for counting and checks)."""
        return self.batcher(images)[0]

    def probe_loss(self, pyramid: list[torch.Tensor], batch_size: int) -> torch.Tensor:
        """FPN neck and RPN head exactly; the RoI heads on the sampler's maximum (box RoIs per image, their
        positive fraction for masks). Anchors, proposals and the real losses depend on the data: left out."""
        features = list(self.neck(pyramid).values())
        objectness, deltas = self.rpn.head(features)
        roi = self.roi_heads
        channels = self.neck.out_channels
        boxes = batch_size * roi.fg_bg_sampler.batch_size_per_image
        masks = int(boxes * roi.fg_bg_sampler.positive_fraction)
        box_size, mask_size = roi.box_roi_pool.output_size, roi.mask_roi_pool.output_size
        # RoIAlign outputs as new leaves (needing gradients, as the real ones): roi_align saves only the boxes
        box_features = torch.empty(boxes, channels, *box_size, requires_grad=True)
        mask_features = torch.empty(masks, channels, *mask_size, requires_grad=True)
        scores, regression = roi.box_predictor(roi.box_head(box_features))
        mask_logits = roi.mask_predictor(roi.mask_head(mask_features))
        outputs = [*objectness, *deltas, scores, regression, mask_logits]
        return sum(t.float().mean() for t in outputs)


def mmdet_rpn(c: MaskRCNNConfig) -> MMDetRPN:
    anchors = MMDetAnchorGenerator(c.anchor_sizes, c.aspect_ratios, STRIDES)
    return MMDetRPN(
        anchors,
        RPNHead(c.fpn_channels, anchors.num_anchors_per_location()[0]),
        batch_size_per_image=c.rpn_batch_size_per_image,
        positive_fraction=c.rpn_positive_fraction,
        pre_nms_top_n={"training": c.rpn_pre_nms_top_n_train, "testing": c.rpn_pre_nms_top_n_test},
        post_nms_top_n={"training": c.rpn_post_nms_top_n_train, "testing": c.rpn_post_nms_top_n_test},
        nms_thresh=c.rpn_nms_thresh,
        size_divisible=c.size_divisible,
    )


def torchvision_rpn(c: MaskRCNNConfig) -> RegionProposalNetwork:
    anchors = AnchorGenerator(
        tuple((s,) for s in c.anchor_sizes), (tuple(c.aspect_ratios),) * len(c.anchor_sizes)
    )
    return RegionProposalNetwork(
        anchors,
        RPNHead(c.fpn_channels, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=0.7,
        bg_iou_thresh=0.3,
        batch_size_per_image=c.rpn_batch_size_per_image,
        positive_fraction=c.rpn_positive_fraction,
        pre_nms_top_n={"training": c.rpn_pre_nms_top_n_train, "testing": c.rpn_pre_nms_top_n_test},
        post_nms_top_n={"training": c.rpn_post_nms_top_n_train, "testing": c.rpn_post_nms_top_n_test},
        nms_thresh=c.rpn_nms_thresh,
    )


def roi_pool(size: int, mmdet: bool) -> MultiScaleRoIAlign:
    if mmdet:
        return MMDetRoIAlign(list(LEVELS), size, STRIDES[: len(LEVELS)])
    return MultiScaleRoIAlign(list(LEVELS), output_size=size, sampling_ratio=2)


def init_like_mmdet(detector: MaskRCNN) -> None:
    """mmdet's init where torchvision's differs: Xavier-uniform FPN convs and shared FCs, N(0, 0.01) class
    and N(0, 0.001) box layers, zero biases (the RPN head and mask head already match)."""
    xavier = [m for m in detector.neck.modules() if isinstance(m, nn.Conv2d)]
    xavier += [detector.roi_heads.box_head.fc6, detector.roi_heads.box_head.fc7]
    for layer in xavier:
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
    predictor = detector.roi_heads.box_predictor
    for layer, std in ((predictor.cls_score, 0.01), (predictor.bbox_pred, 0.001)):
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)
    nn.init.zeros_(detector.roi_heads.mask_predictor.conv5_mask.bias)
    nn.init.zeros_(detector.roi_heads.mask_predictor.mask_fcn_logits.bias)


def check_size_divisible(backbone: nn.Module, divisor: int) -> None:
    """The pyramid must sit exactly at strides 4–32 of the padded batch, or anchors drift off the objects.

    Branch 0 sees the padded batch itself; the other branches see it floored to their resolution (as
    upstream's `F.interpolate` does) and are resampled onto branch 0's grid by the merge, so only branch 0's
    patch size and the stride-32 level constrain the padding.
    """
    patch = backbone.branches[0].strides[-1]
    if divisor % 32 or divisor % patch:
        raise ConfigError(
            f"task.module.detector.size_divisible={divisor}: expected a multiple of 32 and of branch "
            f"{backbone.branches[0].name}'s stride {patch}, so the pyramid has exact strides 4/8/16/32 "
            "(the paper pads to 224 for PIIP models, 64 for single-branch baselines)"
        )
