"""COCO detection and instance segmentation: Mask R-CNN or DINO (`task.module.detector.name`) on the
backbone's pyramid (PAPER.md §3.3).

Validation collects every image's detections as COCO results entries, gathers them on rank 0 and scores
them with pycocotools `COCOeval` against the split's annotation file, so the logged `val/bbox_mAP` and
`val/segm_mAP` are the official numbers. `evaluate.py` also writes the entries as the results JSON files
the COCO server accepts.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from piip.data.files import write_json
from piip.errors import ConfigError
from piip.evaluation import coco as coco_metrics
from piip.models.checks import number_in
from piip.models.heads.detector import build_detector
from piip.tasks.base import PIIPTask, ValidationHooksForTest
from piip.tasks.visualise import log_images

log = logging.getLogger(__name__)

Batch = tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]


class DetectionTask(ValidationHooksForTest, PIIPTask, requires={"head": "pyramid"}):
    """`detector`: `name` selects the detector (default `mask_rcnn`, see `piip.models.heads.detector`), the
    other fields are its config; `num_classes` counts object classes (no background). `evaluate_masks=False`
    scores boxes only and lets the data have annotations without segmentation (the box is then the mask the
    mask head learns), for boxes-only datasets; the data learns it through `data_needs`."""

    def __init__(
        self,
        backbone: dict[str, Any],
        optim: dict[str, Any],
        num_classes: int,
        detector: dict[str, Any] | None = None,
        num_visualised: int = 4,
        score_to_draw: float = 0.5,
        evaluate_masks: bool = True,
        **base: Any,
    ) -> None:
        score_to_draw = number_in(score_to_draw, "task.module.score_to_draw", 0, 1)
        if not isinstance(evaluate_masks, bool):
            raise ConfigError(f"task.module.evaluate_masks: expected true or false, got {evaluate_masks!r}")
        super().__init__(backbone, optim, **base)
        self.detector = build_detector(self.backbone, num_classes, detector)
        if evaluate_masks and not self.detector.predicts_masks:
            raise ConfigError(
                f"task.module.evaluate_masks: the {self.detector.name} detector predicts boxes only; "
                "set false"
            )
        self.num_classes = num_classes
        self.num_visualised = num_visualised
        self.score_to_draw = score_to_draw
        self.evaluate_masks = evaluate_masks
        self._found: dict[int, dict[str, list[dict]]] = {}  # image id -> COCO entries per iou type
        self._examples: list[np.ndarray] = []

    def from_official_heads(
        self, state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """The detector's own official naming (mmdet's for Mask R-CNN)."""
        return self.detector.from_official(state)

    def shard_units(self) -> list[torch.nn.Module]:
        return [*super().shard_units(), *self.detector.shard_units()]

    def data_needs(self) -> dict[str, Any]:
        """Whether the data must carry segmentations (checked at its set-up)."""
        return {"masks": self.evaluate_masks}

    def setup(self, stage: str) -> None:
        self.check_num_classes(self.num_classes, "task.module.num_classes")

    def probe_loss(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone and the detector's heads at their largest training load (see the detector's)."""
        return self.detector.probe_loss(self.backbone(images).pyramid, images.shape[0])

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None) -> Any:
        """Float 0–255 images (any sizes); losses in training, detections at `orig_size` otherwise."""
        return self.detector(images, targets)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        losses = self([image.float() for image in images], targets)
        loss = sum(losses.values())
        self.check_finite(loss, batch_idx)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(images))
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, on_step=True, batch_size=len(images))
        self.log_lr()
        return loss

    # -- evaluation ---------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._found, self._examples = {}, []

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        images, targets = batch
        detections = self([image.float() for image in images], targets)
        category_ids = self.attached_data().category_ids
        for detection, target in zip(detections, targets, strict=True):
            image_id = int(target["image_id"])
            bbox, segm = coco_metrics.results_entries(detection, image_id, category_ids)
            self._found[image_id] = {"bbox": bbox, "segm": segm}
        if len(self._examples) < self.num_visualised and self.trainer.is_global_zero:
            take = self.num_visualised - len(self._examples)
            self._examples += self.draw(images[:take], targets[:take], detections[:take])

    def on_validation_epoch_end(self) -> None:
        found = self._gather()
        image_ids = sorted(found)
        kinds = coco_metrics.iou_types(self.evaluate_masks)
        entries = {kind: [e for i in image_ids for e in found[i][kind]] for kind in kinds}
        metrics: dict[str, float] = {}
        if self.trainer.is_global_zero:
            ground_truth = self.attached_data().ground_truth()
            for iou_type, kind_entries in entries.items():
                scores = coco_metrics.evaluate(ground_truth, kind_entries, iou_type, image_ids)
                metrics.update({f"{iou_type}_{name}": value for name, value in scores.items()})
            self._write_predictions(entries)
        metrics = self.trainer.strategy.broadcast(metrics, src=0)
        stage = "test" if self.trainer.testing else "val"
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value, prog_bar=name in ("bbox_mAP", "segm_mAP"))
        log_images(self, f"{stage}/examples", self._examples)

    def _gather(self) -> dict[int, dict[str, list[dict]]]:
        """Every rank's detections (small: masks are RLE), keyed by image so the images the sampler
        repeated to even out the ranks count once."""
        return {
            image_id: found for part in self.gather_objects(self._found) for image_id, found in part.items()
        }

    def _write_predictions(self, entries: dict[str, list[dict]]) -> None:
        if self.predictions_prefix is None:
            return
        for iou_type, found in entries.items():
            path = write_json(f"{self.predictions_prefix}_{iou_type}.json", found, indent=None)
            log.info("COCO results (%s, %d entries): %s", iou_type, len(found), path)

    # -- pictures -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def annotate(self, images: list[torch.Tensor], targets: list[dict]) -> list[np.ndarray]:
        """Predict and draw: H×W×3 uint8 pictures at each image's stored size."""
        was_training = self.training
        self.eval()
        images = [image.as_subclass(torch.Tensor) for image in images]
        detections = self([image.to(self.device).float() for image in images], targets)
        self.train(was_training)
        return self.draw(images, targets, detections)

    def draw(
        self, images: list[torch.Tensor], targets: list[dict], detections: list[dict]
    ) -> list[np.ndarray]:
        names = self.known_class_names
        pictures = []
        for image, target, detection in zip(images, targets, detections, strict=True):
            size = [int(v) for v in target["orig_size"]]
            picture = torch.nn.functional.interpolate(image[None].float(), size=size, mode="bilinear")[0]
            picture = picture.clamp(0, 255).to(torch.uint8).cpu()
            keep = detection["scores"] >= self.score_to_draw
            boxes = detection["boxes"][keep].cpu()
            labels = detection["labels"][keep].cpu().tolist()
            if "masks" in detection and keep.any():
                masks = detection["masks"][keep][:, 0].cpu() > 0.5
                picture = draw_segmentation_masks(picture, masks, alpha=0.45)
            captions = [names[k - 1] if names else str(k) for k in labels]
            scores = detection["scores"][keep].cpu().tolist()
            captions = [f"{c} {s:.2f}" for c, s in zip(captions, scores, strict=True)]
            if len(boxes):
                picture = draw_bounding_boxes(picture, boxes, captions, width=2)
            pictures.append(picture.permute(1, 2, 0).numpy())
        return pictures
