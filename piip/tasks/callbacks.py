"""Callbacks Lightning does not ship: RNG state in checkpoints, last.ckpt on two triggers, batch sizes."""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint


class RNGState(L.Callback):
    """Save the global python/numpy/torch RNG states with each checkpoint and restore them on resume.

    Together with `piip.data.sampling` (per-sample augmentation RNG, resumable sampler) this makes a run
    resumed mid-epoch draw the same dropout, drop-path and Mixup randomness as an uninterrupted run. States
    are stored as tensors and lists, so checkpoints still load with `weights_only=True`. They are applied
    at `on_train_start`, after Lightning has built the model and the loaders.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        version, state, gauss = random.getstate()
        numpy_state = np.random.get_state(legacy=False)
        state_dict = {
            "python": [version, list(state), gauss],
            "numpy_key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "numpy_pos": int(numpy_state["state"]["pos"]),
            "numpy_gauss": [int(numpy_state["has_gauss"]), float(numpy_state["gauss"])],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state_dict["cuda"] = torch.cuda.get_rng_state_all()
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        version, values, gauss = state["python"]
        random.setstate((version, tuple(values), gauss))
        np.random.set_state(
            {
                "bit_generator": "MT19937",
                "state": {"key": state["numpy_key"].numpy().astype(np.uint32), "pos": state["numpy_pos"]},
                "has_gauss": state["numpy_gauss"][0],
                "gauss": state["numpy_gauss"][1],
            }
        )
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


def batch_images(batch: Any) -> int:
    """Samples in a batch of `(images, targets)`, a dict with `images`, or a batch object that counts its
    rows (`num_samples`, multimodal batches): for `ThroughputMonitor`."""
    if hasattr(batch, "num_samples"):
        return batch.num_samples
    images = batch["images"] if isinstance(batch, dict) else batch[0]
    return len(images)


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt` every `every_n_train_steps` steps *and* at every training-epoch end, each one a state a
    resume continues from exactly.

    Lightning's `ModelCheckpoint` takes one trigger: with `every_n_train_steps` set it never saves at an
    epoch end, so a run's final `last.ckpt` could be hundreds of steps old. And a step save that falls on an
    epoch's last batch records the epoch before its validation has run; resuming from it (after a kill in
    that validation) skipped the epoch's end. So the step trigger leaves an epoch's last batch alone, and the
    epoch-end save comes after the validation (Lightning calls `on_train_epoch_end` after it).
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if args[-1] + 1 >= trainer.num_training_batches:  # batch_idx of the epoch's last batch
            return
        super().on_train_batch_end(trainer, pl_module, *args)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if (
            self.save_last
            and trainer.state.fn == "fit"
            and not (trainer.fast_dev_run or trainer.sanity_checking)
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
