"""ImageNet-style classification with the backbone's own classifier (merged or per-branch, PAPER.md §1.7)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from piip.errors import ConfigError
from piip.tasks.base import PIIPTask


class ClassificationTask(PIIPTask, requires={"head": "classification"}):
    """Mixup/CutMix with soft targets and label smoothing in training; top-1/top-5 at evaluation.

    `mixup` takes timm `Mixup` arguments (mixup_alpha, cutmix_alpha, prob, switch_prob, mode); with both
    alphas 0 it is off and training uses cross-entropy with `label_smoothing`. With `task.optim.ema_decay`
    an EMA of the backbone (which holds the classifier) is kept and evaluated beside the weights (`*_ema/`).
    """

    keeps_ema = True

    def __init__(
        self,
        backbone: dict[str, Any],
        optim: dict[str, Any],
        num_classes: int,
        label_smoothing: float = 0.1,
        mixup: dict[str, Any] | None = None,
        **base: Any,
    ) -> None:
        if backbone.get("num_classes") != num_classes:
            raise ConfigError(
                f"task.module.num_classes ({num_classes}) differs from the model's num_classes "
                f"({backbone.get('num_classes')}); set task.backbone.num_classes"
            )
        super().__init__(backbone, optim, **base)
        self.ema: ModelEmaV3 | None = None
        if self.optim_config.ema_decay:
            self.ema = ModelEmaV3(self.backbone, decay=self.optim_config.ema_decay)
            self.ema.requires_grad_(False)
        mixup = dict(mixup or {})
        self.mixup: Mixup | None = None
        if mixup.get("mixup_alpha", 0) > 0 or mixup.get("cutmix_alpha", 0) > 0:
            self.mixup = Mixup(**mixup, label_smoothing=label_smoothing, num_classes=num_classes)
        self.label_smoothing = label_smoothing
        self.soft_loss = SoftTargetCrossEntropy()
        top_k = min(5, num_classes)
        metrics = {"top1": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
        if top_k > 1:
            metrics[f"top{top_k}"] = MulticlassAccuracy(num_classes, top_k=top_k, average="micro")
        self.metrics = nn.ModuleDict(
            {
                f"{stage}{suffix}": MetricCollection(metrics, prefix=f"{stage}{suffix}/").clone()
                for stage in ("val", "test")
                for suffix in ("", "_ema")
            }
        )
        self.losses = nn.ModuleDict({stage: MeanMetric() for stage in ("val", "val_ema", "test", "test_ema")})

    def setup(self, stage: str) -> None:
        self.check_num_classes(self.hparams.num_classes, "task.backbone.num_classes")

    def configure_model(self) -> None:
        if self.ema is not None and self.sharding_strategy() is not None:
            raise ConfigError(
                "trainer=fsdp: task.optim.ema_decay is set, but the EMA copy of the backbone is not sharded; "
                "set task.optim.ema_decay=null or train with trainer=ddp"
            )
        super().configure_model()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.backbone, step=self.global_step)

    def evaluation_models(self) -> dict[str, nn.Module]:
        """Models evaluated at validation/test: the trained weights and, when kept, their EMA."""
        models: dict[str, nn.Module] = {"": self.backbone}
        if self.ema is not None:
            models["ema"] = self.ema.module
        return models

    def probe_loss(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone with its classifier (the loss itself costs nothing to speak of)."""
        return self.backbone(images).logits.float().mean()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images).logits

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        if self.mixup is not None:
            images, soft_targets = self.mixup(images, targets)
            loss = self.soft_loss(self(images), soft_targets)
        else:
            loss = F.cross_entropy(self(images), targets, label_smoothing=self.label_smoothing)
        self.check_finite(loss, batch_idx)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(images))
        self.log_lr()
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        images, targets = batch
        for suffix, model in self.evaluation_models().items():
            name = f"{stage}_{suffix}" if suffix else stage
            logits = model(images).logits.float()
            self.losses[name].update(F.cross_entropy(logits, targets), weight=len(images))
            self.metrics[name].update(logits, targets)
            self.log(f"{name}/loss", self.losses[name], on_epoch=True, batch_size=len(images))
            self.log_dict(self.metrics[name], on_epoch=True, prog_bar=not suffix, batch_size=len(images))

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    # -- pictures -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def top_classes(self, images: torch.Tensor, k: int = 5) -> list[list[tuple[str, float]]]:
        """The k most probable (class name, probability) pairs of each image, most probable first."""
        was_training = self.training
        self.eval()
        try:
            probabilities = self(images.to(self.device)).float().softmax(dim=-1).cpu()
        finally:
            self.train(was_training)
        names = self.known_class_names or [f"class {i}" for i in range(probabilities.shape[-1])]
        top = probabilities.topk(min(k, probabilities.shape[-1]), dim=-1)
        return [
            [(names[i], p) for p, i in zip(values.tolist(), indices.tolist(), strict=True)]
            for values, indices in zip(top.values, top.indices, strict=True)
        ]

    @staticmethod
    def draw_predictions(
        targets: list[dict[str, Any]], rankings: list[list[tuple[str, float]]]
    ) -> list[np.ndarray]:
        """Each original picture (`target["original"]`, 3×H×W uint8) with its top class and probability in a
        band below it, so the caption hides none of the image; the band widens narrow images to fit it."""
        font = ImageFont.load_default()
        pictures = []
        for target, ranking in zip(targets, rankings, strict=True):
            image = Image.fromarray(target["original"].permute(1, 2, 0).cpu().numpy())
            name, probability = ranking[0]
            caption = f"{name} {probability:.1%}"
            left, top, right, bottom = ImageDraw.Draw(image).textbbox((0, 0), caption, font=font)
            band = bottom - top + 8
            canvas = Image.new("RGB", (max(image.width, right - left + 8), image.height + band), "white")
            canvas.paste(image, (0, 0))
            ImageDraw.Draw(canvas).text((4, image.height + 4 - top), caption, fill="black", font=font)
            pictures.append(np.asarray(canvas))
        return pictures

    def annotate(self, images: list[torch.Tensor], targets: list[dict[str, Any]]) -> list[np.ndarray]:
        """Predict and draw (`prediction_input` pairs): each picture captioned with its top class."""
        return self.draw_predictions(targets, self.top_classes(torch.stack(images)))
