"""Semantic segmentation: the PIIP pyramid into UperNet + an FCN auxiliary head (PAPER.md §3.4, mmseg recipe).

Training: cross-entropy (ignore 255) of the decode logits upsampled to the label size, plus `aux_weight` ×
the same loss of the auxiliary head. Evaluation: `slide` (crop = highest branch resolution, windows every
`slide_stride` pixels) or `whole` inference on the resized image, logits resized back to the original size,
mIoU/mAcc/aAcc over the dataset's confusion matrix. EMA is refused (`PIIPTask.keeps_ema`): evaluating an
averaged backbone under trained heads would not be the EMA model.
"""

from __future__ import annotations

import colorsys
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from piip.errors import ConfigError
from piip.evaluation.ade20k import IGNORE_INDEX, SegmentationScores
from piip.models.convert.mmseg_upernet import convert_upernet
from piip.models.heads.sliding import slide_inference, whole_inference
from piip.models.heads.upernet import FCNHead, UperNetHead, resize
from piip.tasks.base import PIIPTask
from piip.tasks.visualise import log_images

INFERENCE_MODES = ("slide", "whole")


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over labelled pixels at the label's size; 0 (with a graph) when none is labelled."""
    logits = resize(logits.float(), labels.shape[-2:])
    if not (labels != IGNORE_INDEX).any():
        return logits.sum() * 0.0  # mean over no pixel would be nan
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


def palette(num_classes: int) -> np.ndarray:
    """A fixed, well-spread colour per class (golden-ratio hues), (num_classes, 3) uint8."""
    colours = [
        colorsys.hsv_to_rgb(i * 0.618034 % 1.0, 0.85, 0.95 - 0.3 * (i % 2)) for i in range(num_classes)
    ]
    return (np.array(colours) * 255).round().astype(np.uint8)


class SegmentationTask(PIIPTask, requires={"head": "pyramid"}):
    """UperNet segmenter on the backbone's 4-level pyramid; see the module docstring."""

    def __init__(
        self,
        backbone: dict[str, Any],
        optim: dict[str, Any],
        num_classes: int,
        channels: int = 512,
        aux_channels: int = 256,
        aux_weight: float = 0.4,
        pool_scales: list[int] | tuple[int, ...] = (1, 2, 3, 6),
        dropout: float = 0.1,
        inference: str = "slide",
        slide_stride: int | None = None,
        num_visualised: int = 4,
        **base: Any,
    ) -> None:
        if inference not in INFERENCE_MODES:
            raise ConfigError(f"task.module.inference: expected one of {INFERENCE_MODES}, got {inference!r}")
        crop = int(backbone["resolutions"][0])
        stride = slide_stride if slide_stride is not None else max(crop * 2 // 3, 1)
        if not 0 < stride <= crop:
            raise ConfigError(
                f"task.module.slide_stride ({slide_stride}) must be in (0, crop={crop}] (the crop is the "
                "highest branch resolution); larger strides would leave pixels unpredicted"
            )
        super().__init__(backbone, optim, **base)
        self.crop, self.stride = crop, stride
        levels = self.backbone.pyramid.out_channels
        self.decode_head = UperNetHead(levels, channels, num_classes, tuple(pool_scales), dropout)
        self.aux_head = FCNHead(levels[2], aux_channels, num_classes, in_index=2, dropout=dropout)
        self.colours = palette(num_classes)
        self.scores = nn.ModuleDict({s: SegmentationScores(num_classes) for s in ("val", "test")})
        self.losses = nn.ModuleDict({s: MeanMetric() for s in ("val", "test")})
        self._examples: list[np.ndarray] = []

    def from_official_heads(
        self, state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """mmseg's UPerHead (`decode_head.`) and FCNHead (`auxiliary_head.`)."""
        return convert_upernet(state)

    def setup(self, stage: str) -> None:
        self.check_num_classes(self.hparams.num_classes, "task.module.num_classes")

    # -- model ----------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Decode logits at stride 4 of `images`."""
        return self.decode_head(self.backbone(images).pyramid)

    def probe_loss(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone, UperNet + FCN heads and their full-resolution cross-entropy.

        Without `segmentation_loss`'s data-dependent check: the memory estimate runs on fake tensors, which
        hold no labels to look at."""
        labels = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.long)
        pyramid = self.backbone(images).pyramid
        decode, aux = (
            F.cross_entropy(
                resize(head(pyramid).float(), labels.shape[-2:]), labels, ignore_index=IGNORE_INDEX
            )
            for head in (self.decode_head, self.aux_head)
        )
        return decode + self.hparams.aux_weight * aux

    def losses_of(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """`decode`, `aux` and the weighted `total` the optimiser sees."""
        pyramid = self.backbone(images).pyramid
        decode = segmentation_loss(self.decode_head(pyramid), labels)
        aux = segmentation_loss(self.aux_head(pyramid), labels)
        return {"decode": decode, "aux": aux, "total": decode + self.hparams.aux_weight * aux}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        losses = self.losses_of(images, labels)
        self.check_finite(losses["total"], batch_idx)
        self.log(
            "train/loss", losses["total"], on_step=True, on_epoch=True, prog_bar=True, batch_size=len(images)
        )
        self.log_dict(
            {"train/loss_decode": losses["decode"], "train/loss_aux": losses["aux"]},
            on_step=True,
            on_epoch=False,
            batch_size=len(images),
        )
        self.log_lr()
        return losses["total"]

    @torch.no_grad()
    def predict_logits(self, image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(1, C, *size) logits of one normalised (3, h, w) image, resized back to its original `size`."""
        images = image[None].to(self.device)
        if self.hparams.inference == "slide":
            logits = slide_inference(self, images, self.crop, self.stride)
        else:
            logits = whole_inference(self, images)
        return resize(logits, size)

    # -- evaluation -----------------------------------------------------------------------------------------
    def _evaluate(self, batch: tuple[list[torch.Tensor], list[dict[str, Any]]], stage: str) -> None:
        for image, target in zip(*batch, strict=True):
            logits = self.predict_logits(image, target["size"])
            label = target["label"].to(self.device)[None]
            prediction = logits.argmax(dim=1)
            self.scores[stage].update(prediction, label)
            if (label != IGNORE_INDEX).any():
                self.losses[stage].update(F.cross_entropy(logits, label, ignore_index=IGNORE_INDEX))
            if stage == "val" and len(self._examples) < self.hparams.num_visualised:
                self._examples.append(self.overlay(image, target, prediction[0]))

    def _log_epoch(self, stage: str) -> None:
        scores = self.scores[stage].compute()
        self.log_dict(
            {f"{stage}/{k}": v for k, v in scores.items()}, prog_bar=stage == "val", sync_dist=False
        )
        self.log(f"{stage}/loss", self.losses[stage].compute())
        self.scores[stage].reset()
        self.losses[stage].reset()

    def on_validation_epoch_start(self) -> None:
        self._examples = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")
        log_images(self, "val/examples", self._examples)
        self._examples = []

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    # -- drawing --------------------------------------------------------------------------------------------
    def overlay(self, image: torch.Tensor, target: dict[str, Any], prediction: torch.Tensor) -> np.ndarray:
        """The image at its original size, half-blended with the colour of each pixel's predicted class."""
        mean = torch.tensor(target["mean"], device=image.device).view(3, 1, 1)
        std = torch.tensor(target["std"], device=image.device).view(3, 1, 1)
        rgb = resize((image.float() * std + mean)[None], target["size"])[0]
        rgb = (rgb.clamp(0, 1) * 255).permute(1, 2, 0).cpu().numpy()
        colours = self.colours[prediction.cpu().numpy()]
        return (0.5 * rgb + 0.5 * colours).round().astype(np.uint8)

    def annotate(self, images: list[torch.Tensor], targets: list[dict[str, Any]]) -> list[np.ndarray]:
        """H×W×3 uint8 prediction overlays at each image's original size (`prediction_input` pairs)."""
        was_training = self.training
        self.eval()
        try:
            return [
                self.overlay(image, target, self.predict_logits(image, target["size"]).argmax(dim=1)[0])
                for image, target in zip(images, targets, strict=True)
            ]
        finally:
            self.train(was_training)
