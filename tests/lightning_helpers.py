"""Callbacks the training tests add through the config (`+callbacks.x._target_=tests.lightning_helpers.…`)."""

from __future__ import annotations

import lightning as L
import torch


class CrashAtStep(L.Callback):
    """Simulates a killed job: raises before training batch `step` (a global step count)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx
    ) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


class PoisonWeightsAtStep(L.Callback):
    """Makes the next loss non-finite at global step `step` by writing NaN into one weight."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx
    ) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.backbone.parameters()).fill_(float("nan"))
