"""Callbacks that stop a training run at a chosen moment (as a kill would) and record where epochs end,
for the resume tests (`+callbacks.x._target_=tests.kill_points.…`)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L


class Killed(RuntimeError):
    """What the kill-point callbacks raise: the run stops there, saving nothing more."""


class KillBeforeStep(L.Callback):
    """Before the training batch of global step `step` (mid-epoch, right after a save, at an epoch start)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"killed before step {self.step}")


class KillInValidation(L.Callback):
    """During validation batch `batch` of the validation after epoch `epoch`."""

    def __init__(self, epoch: int, batch: int = 1) -> None:
        self.epoch, self.batch = epoch, batch

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int, *args) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch and not trainer.sanity_checking:
            raise Killed(f"killed in the validation of epoch {self.epoch}")


class KillDuringSave(L.Callback):
    """Inside the save of the checkpoint at global step `step`, before the file is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save_checkpoint(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            raise Killed(f"killed while saving at step {self.step}")


class RecordEpochEnds(L.Callback):
    """Appends `epoch global_step` to `<run>/epoch_ends.txt` at every training-epoch end (all attempts)."""

    def on_train_epoch_end(self, trainer: L.Trainer, *args) -> None:
        with Path(trainer.default_root_dir, "epoch_ends.txt").open("a") as file:
            file.write(f"{trainer.current_epoch} {trainer.global_step}\n")

    @staticmethod
    def read(run_dir: Path) -> dict[int, int]:
        """epoch -> global step at its end (the last attempt's record wins)."""
        lines = (run_dir / "epoch_ends.txt").read_text().split("\n")
        return {int(e): int(s) for e, s in (line.split() for line in lines if line)}


def losses_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())
