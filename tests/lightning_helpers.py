"""Callbacks the training tests add through the config (`+callbacks.x._target_=tests.lightning_helpers.…`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import torch

from piip.distributed.cluster import submitit_signal


class _AtStep(L.Callback):
    """Acts once, before the training batch of global step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step == self.step:
            self.act(pl_module)

    def act(self, pl_module: L.LightningModule) -> None:
        raise NotImplementedError


class CrashAtStep(_AtStep):
    """Simulates a killed job."""

    def act(self, pl_module: L.LightningModule) -> None:
        raise RuntimeError(f"simulated crash at step {self.step}")


class PoisonWeightsAtStep(_AtStep):
    """Makes the next loss non-finite by writing NaN into one weight."""

    def act(self, pl_module: L.LightningModule) -> None:
        with torch.no_grad():
            next(pl_module.backbone.parameters()).fill_(float("nan"))


class RecordLosses(L.Callback):
    """Keeps `<run>/losses/rank<r>_from<first step>.json` up to date with this rank's loss of every step
    (written after each step, so a run that crashes still leaves its trajectory)."""

    def __init__(self) -> None:
        self.first_step: int | None = None
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, *args) -> None:
        if self.first_step is None:
            self.first_step = trainer.global_step - 1  # the step this batch was
        self.losses.append(float(outputs["loss"]))
        folder = Path(trainer.default_root_dir, "losses")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank{trainer.global_rank}_from{self.first_step}.json").write_text(json.dumps(self.losses))


class PreemptAtStep(_AtStep):
    """Sends submitit's preemption signal to global rank 0 before step `step` of a job's first attempt.

    Rank 0 of each attempt appends the global step it starts training at to `<run>/train_starts.txt`; the
    signal is sent only while that file has one line, so the resumed attempt is not preempted again. Other
    ranks get no signal: they learn of it from rank 0 (as when SLURM's signal reaches ranks at different
    times).
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.first_attempt = False
        if trainer.is_global_zero:
            starts = Path(trainer.default_root_dir, "train_starts.txt")
            with starts.open("a") as file:
                file.write(f"{trainer.global_step}\n")
            self.first_attempt = len(starts.read_text().split()) == 1

    def act(self, pl_module: L.LightningModule) -> None:
        if self.first_attempt:
            os.kill(os.getpid(), submitit_signal())
