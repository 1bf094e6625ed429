"""What every PIIP LightningModule shares: the backbone, AdamW with layer-wise decay, schedule, guards, and
the data it is attached to (`TaskData`).

Hyper-parameters are plain data (dicts of the resolved config), so checkpoints load with
`torch.load(..., weights_only=True)` and `evaluate.py` can rebuild the model from the checkpoint alone.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from piip.errors import ConfigError
from piip.models import PIIPBackbone, PIIPConfig
from piip.tasks.data import TaskData
from piip.tasks.finite import (
    checkpoint_candidates,
    describe,
    find_nonfinite,
    last_finite_checkpoint,
    read_file_weights,
)
from piip.tasks.optim import OptimConfig, build_optimizer, build_scheduler, parameter_groups

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/inf: in the loss or the gradients (raised before the optimizer step) or in the
    weights the step wrote (raised right after it, before any callback can save them). Either way no
    checkpoint holds them. `kind` (loss | gradients | weights), `step`, `epoch`, `batch`, `tensors` (this
    rank's non-finite ones) and `last_good` (the newest checkpoint whose weights were read back finite)."""

    def __init__(
        self,
        message: str,
        kind: str = "loss",
        step: int = -1,
        epoch: int = -1,
        batch: int = -1,
        tensors: list[str] | None = None,
        last_good: Path | None = None,
    ) -> None:
        super().__init__(message)
        self.kind, self.step, self.epoch, self.batch = kind, step, epoch, batch
        self.tensors, self.last_good = tensors or [], last_good


class PIIPTask(L.LightningModule):
    """Base class; subclasses add heads, `training_step` and evaluation.

    `run_config` is the whole resolved run config (model, task, data, trainer), stored in the checkpoint
    so a checkpoint describes itself; it is not used for building. Subclasses declare the backbone settings
    they need (`requires=` in the class statement), checked here before anything is built.
    """

    backbone_requirements: ClassVar[dict[str, Any]] = {}  # `class X(PIIPTask, requires={"head": "pyramid"})`
    keeps_ema: ClassVar[bool] = False  # whether `task.optim.ema_decay` is supported

    def __init_subclass__(cls, requires: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if requires is not None:
            cls.backbone_requirements = dict(requires)

    def __init__(
        self,
        backbone: dict[str, Any],
        optim: dict[str, Any],
        load_pretrained: bool = False,
        grad_checkpointing: bool = False,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        self.check_backbone(backbone)
        super().__init__()
        self.save_hyperparameters()
        self.backbone = PIIPBackbone(PIIPConfig.from_dict(copy.deepcopy(backbone)))
        self.optim_config = OptimConfig.from_dict(optim)
        if self.optim_config.ema_decay and not self.keeps_ema:
            raise ConfigError(
                f"task.optim.ema_decay: {type(self).__name__} keeps no EMA of its weights (an EMA of the "
                "backbone alone would not match the heads it is evaluated with); set it to null"
            )
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
        self.data: TaskData | None = None

    @classmethod
    def check_backbone(cls, backbone: dict[str, Any]) -> None:
        """Refuse backbone settings this task cannot use, naming the key to set."""
        for key, needed in cls.backbone_requirements.items():
            if backbone.get(key) != needed:
                raise ConfigError(
                    f"task.backbone.{key}: {cls.__name__} needs {needed!r}, got {backbone.get(key)!r}"
                )

    # -- data ---------------------------------------------------------------------------------------------
    def data_needs(self) -> dict[str, Any]:
        """What the data must know of this model (`TaskData.fit_to_task`), e.g. tokens per image."""
        return {}

    def attach_data(self, data: TaskData) -> None:
        """The data this task trains and evaluates on (the run layer calls this before fit/validate/test)."""
        self.data = data

    def attached_data(self) -> TaskData:
        if self.data is None:
            raise RuntimeError(
                f"{type(self).__name__} has no data attached: call piip.run.build.connect(task, datamodule) "
                "before trainer.fit/validate/test (train.py and evaluate.py do)"
            )
        return self.data

    # -- parallelism --------------------------------------------------------------------------------------
    def shard_units(self) -> list[nn.Module]:
        """The blocks FSDP shards one by one; tasks with more than a backbone add theirs."""
        return self.backbone.shard_units()

    def sharded_forward_methods(self) -> dict[str, tuple[nn.Module, Any]]:
        """Entry points other than `forward` that sharded units need (name -> (unit, function))."""
        return {}

    def sharding_strategy(self) -> Any:
        """The trainer's strategy when it shards the model (`piip.distributed.fsdp` offers `shard_task`,
        which shards from `shard_units`), else None."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        return strategy if hasattr(strategy, "shard_task") else None

    def configure_model(self) -> None:
        """Lightning calls this before the optimizer exists (for fit and again for test): shard, if asked."""
        strategy = self.sharding_strategy()
        if strategy is not None:
            strategy.shard_task(self)

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

    def check_num_classes(self, built_for: int, field: str) -> None:
        """Refuse data whose class count differs from the model's, naming the config field to set."""
        data = self.data
        found = data.num_classes if data is not None else None
        if found is not None and found != built_for:
            raise ConfigError(
                f"the dataset at {getattr(data, 'root', '?')} has {found} classes but the model is built for "
                f"{built_for}; set {field}={found}"
            )

    # -- guards and logging -------------------------------------------------------------------------------
    def check_finite(self, loss: torch.Tensor, batch_idx: int) -> None:
        """The loss of this training step (called by each task's `training_step`)."""
        if not torch.isfinite(loss.detach()).all():
            self.stop_nonfinite(f"non-finite training loss ({loss.item()})", "loss", batch_idx, [], "before")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The gradients, before the optimizer (or clipping) uses them. Not under fp16 AMP: its GradScaler
        expects inf gradients now and then, skips those steps and lowers its scale."""
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = {name: p.grad for name, p in self.named_parameters() if p.grad is not None}
        anywhere, bad = find_nonfinite(grads)
        if anywhere:
            what = f"non-finite gradients in {describe(bad, len(grads))}"
            self.stop_nonfinite(what, "gradients", self.trainer.fit_loop.epoch_loop.batch_idx, bad, "before")

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Any = None,
    ) -> None:
        """The step, then the weights it wrote (trainable parameters and floating buffers): a step with a
        finite loss and finite gradients can still overflow them (a huge learning rate). Checked before
        `on_train_batch_end`, where ModelCheckpoint would save them."""
        step = self.global_step
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        weights = {name: p for name, p in self.named_parameters() if p.requires_grad}
        weights |= {name: b for name, b in self.named_buffers() if b.is_floating_point()}
        anywhere, bad = find_nonfinite(weights)
        if anywhere:
            what = f"the optimizer step wrote non-finite weights into {describe(bad, len(weights))}"
            self.stop_nonfinite(what, "weights", batch_idx, bad, "after", step=step)

    def stop_nonfinite(
        self, what: str, kind: str, batch_idx: int, tensors: list[str], when: str, step: int | None = None
    ) -> NoReturn:
        """Raise NonFiniteLossError naming the step and the last checkpoint whose weights are finite."""
        step = self.global_step if step is None else step
        last, note = self.last_finite_checkpoint()
        stopped = (
            "stopped before the optimizer step (the weights are unchanged)"
            if when == "before"
            else "stopped before any checkpoint of these weights"
        )
        raise NonFiniteLossError(
            f"{what} at global step {step}, epoch {self.current_epoch}, batch {batch_idx}; {stopped}. "
            f"The last good checkpoint (weights read back, all finite): {last or 'none'}{note}. Lower "
            "task.optim.lr, enable task.optim.gradient_clip, or check this batch's data.",
            kind=kind,
            step=step,
            epoch=self.current_epoch,
            batch=batch_idx,
            tensors=tensors,
            last_good=last,
        )

    def last_finite_checkpoint(self) -> tuple[Path | None, str]:
        """The newest checkpoint in the checkpoint callbacks' folders whose weights, read from disk, are all
        finite (rank 0 reads; other ranks point to its message), and a note on those skipped."""
        if not self.trainer.is_global_zero:
            return None, " (rank 0 names it)"
        folders = [Path(c.dirpath) for c in self.trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
        read = getattr(self.trainer.strategy.checkpoint_io, "read_weights", read_file_weights)
        last, skipped = last_finite_checkpoint(checkpoint_candidates(folders), read)
        return last, f" (skipped: {'; '.join(skipped)})" if skipped else ""

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
        return (self.data.class_names if self.data is not None else None) or self.class_names

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.known_class_names:
            checkpoint["class_names"] = list(self.known_class_names)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.class_names = checkpoint.get("class_names", self.class_names)

    def split_official(
        self, state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """An official checkpoint's backbone tensors (names relative to the backbone) and the rest.

        mmdet/mmseg checkpoints hold the backbone under `backbone.` beside their heads; the classification
        code's checkpoints are the backbone itself."""
        if not any(k.startswith("backbone.") for k in state):
            return dict(state), {}
        backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        return backbone, {k: v for k, v in state.items() if not k.startswith("backbone.")}

    def from_official_heads(
        self, state: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """An official checkpoint's non-backbone tensors -> this task's keys, and the keys not placed
        (`piip.run.convert`). The classification heads live in the backbone, so the base task places none."""
        return {}, sorted(state)

    # -- memory estimate ----------------------------------------------------------------------------------
    def probe_loss(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone only.

        A loss through every output the task trains whose cost does not depend on the data, for
        `piip.analysis.memory` to count what one training step saves for backward. Overrides start their
        docstring with what they run (the memory report quotes that line)."""
        return backbone_probe_loss(self.backbone(images))


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


def backbone_probe_loss(out: Any) -> torch.Tensor:
    """Reads every output of a `PIIPOutput`: the pyramid, else the merged map, else every branch map; and
    the logits."""
    tensors = out.pyramid or ([out.features] if out.features is not None else out.branch_maps)
    tensors = [*tensors, *([out.logits] if out.logits is not None else [])]
    return sum(t.float().mean() for t in tensors)
