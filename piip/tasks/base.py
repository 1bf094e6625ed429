"""What every PIIP LightningModule shares: the backbone, AdamW with layer-wise decay, schedule, EMA, guards.

Hyper-parameters are plain data (dicts of the resolved config), so checkpoints load with
`torch.load(..., weights_only=True)` and `evaluate.py` can rebuild the model from the checkpoint alone.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3
from torch import nn
from torch.distributed.fsdp import FSDPModule

from piip.distributed.fsdp import FSDP2Strategy
from piip.errors import ConfigError
from piip.models import PIIPBackbone, PIIPConfig
from piip.tasks.optim import OptimConfig, build_optimizer, build_scheduler, parameter_groups

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised before the optimizer step, so no checkpoint is written from poisoned weights."""


class PIIPTask(L.LightningModule):
    """Base class; subclasses add heads, `training_step` and evaluation.

    `run_config` is the whole resolved run config (model, task, data, trainer), stored in the checkpoint
    so a checkpoint describes itself; it is not used for building.
    """

    def __init__(
        self,
        backbone: dict[str, Any],
        optim: dict[str, Any],
        load_pretrained: bool = False,
        grad_checkpointing: bool = False,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = PIIPBackbone(PIIPConfig.from_dict(copy.deepcopy(backbone)))
        self.optim_config = OptimConfig.from_dict(optim)
        if load_pretrained:
            for name, report in self.backbone.load_pretrained().items():
                log.info("branch %s: loaded %s (%d missing keys)", name, report.path, len(report.missing))
        if grad_checkpointing:
            self.backbone.set_grad_checkpointing(True)
        unread = self.backbone.unread_parameters()
        for name in unread:
            self.backbone.get_parameter(name).requires_grad_(False)
        if unread:
            log.info("froze %d parameters no output reads (see PIIPBackbone.unread_parameters)", len(unread))
        # evaluate.py points this at the checkpoint; tasks with per-image predictions (COCO results JSON)
        # write `<prefix>_<kind>.json` there
        self.predictions_prefix: Path | None = None
        self.class_names: list[str] | None = None  # as a loaded checkpoint kept them (see known_class_names)
        self.ema: ModelEmaV3 | None = None
        if self.optim_config.ema_decay:
            self.ema = ModelEmaV3(self.backbone, decay=self.optim_config.ema_decay)
            self.ema.requires_grad_(False)

    # -- parallelism --------------------------------------------------------------------------------------
    def shard_units(self) -> list[nn.Module]:
        """The blocks FSDP shards one by one; tasks with more than a backbone add theirs."""
        return self.backbone.shard_units()

    def configure_model(self) -> None:
        """Lightning calls this before the optimizer exists (for fit and again for test): shard under FSDP."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if not isinstance(strategy, FSDP2Strategy) or isinstance(self.backbone, FSDPModule):
            return
        if self.ema is not None:
            raise ConfigError(
                "trainer=fsdp: task.optim.ema_decay is set, but the EMA copy of the backbone is not sharded; "
                "set task.optim.ema_decay=null or train with trainer=ddp"
            )
        strategy.shard(self, self.shard_units())

    # -- optimisation -------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        groups = parameter_groups(
            self,
            self.optim_config,
            layer_id=self.backbone.layer_id,
            num_layers=self.backbone.num_decay_layers,
            no_weight_decay=self.backbone.no_weight_decay(),
            prefix="backbone.",
        )
        optimizer = build_optimizer(groups, self.optim_config)
        total = int(self.trainer.estimated_stepping_batches)
        epochs = max(self.trainer.max_epochs or 1, 1)
        steps_per_epoch = total / epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else total
        return {
            "optimizer": optimizer,
            "lr_scheduler": build_scheduler(optimizer, self.optim_config, total, steps_per_epoch),
        }

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        clip = gradient_clip_val or self.optim_config.gradient_clip
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self.backbone, step=self.global_step)

    def check_num_classes(self, built_for: int, field: str) -> None:
        """Refuse data whose class count differs from the model's, naming the config field to set."""
        data = self.trainer.datamodule if self._trainer is not None else None
        found = getattr(data, "num_classes", None)
        if found is not None and found != built_for:
            raise ConfigError(
                f"the dataset at {getattr(data, 'root', '?')} has {found} classes but the model is built for "
                f"{built_for}; set {field}={found}"
            )

    # -- guards and logging -------------------------------------------------------------------------------
    def check_finite(self, loss: torch.Tensor, batch_idx: int) -> None:
        if not torch.isfinite(loss.detach()).all():
            saved = [c.last_model_path for c in self.trainer.checkpoint_callbacks if c.last_model_path]
            last = saved[0] if saved else "none written yet"
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at global step {self.global_step}, epoch "
                f"{self.current_epoch}, batch {batch_idx}; stopped before the optimizer step. The last good "
                f"checkpoint is untouched: {last}. Lower task.optim.lr, enable task.optim.gradient_clip, "
                "or check this batch's data."
            )

    @staticmethod
    def gather_objects(obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order; `[obj]` outside distributed runs."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return [obj]
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, obj)
        return parts

    def log_lr(self) -> None:
        optimizer = self.trainer.optimizers[0]
        self.log("train/lr", max(g["lr"] for g in optimizer.param_groups), on_step=True, on_epoch=False)

    def annotate(self, images: list[torch.Tensor], targets: list[dict[str, Any]]) -> list[np.ndarray]:
        """Predictions drawn on the images (H×W×3 uint8), for `piip.tools.predict` and validation logging."""
        raise NotImplementedError(f"{type(self).__name__} does not draw its predictions")

    @property
    def known_class_names(self) -> list[str] | None:
        """The attached data's class names, else those the loaded checkpoint kept."""
        data = self._trainer.datamodule if self._trainer is not None else None
        return getattr(data, "class_names", None) or self.class_names

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.known_class_names:
            checkpoint["class_names"] = list(self.known_class_names)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.class_names = checkpoint.get("class_names", self.class_names)

    def evaluation_models(self) -> dict[str, nn.Module]:
        """Models evaluated at validation/test: the trained weights and, when kept, their EMA."""
        models: dict[str, nn.Module] = {"": self.backbone}
        if self.ema is not None:
            models["ema"] = self.ema.module
        return models


class ValidationHooksForTest:
    """For tasks whose evaluation gathers predictions over an epoch (COCO results, generated answers): the
    test stage runs the validation hooks unchanged (the test split is the val split; see ResumableDataModule)
    and logs under `test/` because they read `trainer.testing`."""

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def on_test_epoch_end(self) -> None:
        self.on_validation_epoch_end()
