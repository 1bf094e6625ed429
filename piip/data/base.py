"""What every piip DataModule shares: resumable, rank-sharded loaders with per-sample seeded augmentation.

Subclasses say where the data is (`setup`) and how one split becomes a dataset (`train_dataset`,
`val_dataset`); this class turns them into loaders and records where training stands in the data, so a run
resumed mid-epoch continues with the very next batch (see `piip.data.sampling`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from piip.data.sampling import ResumableSampler
from piip.errors import ConfigError, DataError
from piip.models.checks import optional_whole_number, whole_number

log = logging.getLogger(__name__)


def load_rgb(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {path}: {err}. Remove or replace this file.") from err


class ResumableDataModule(L.LightningDataModule):
    """Resumable loaders for every format, and the defaults of the `TaskData` contract."""

    collate_fn: Callable[[list[Any]], Any] | None = None  # None: torch's default collation

    def __init__(
        self,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        pin_memory: bool,
        persistent_workers: bool,
        seed: int,
    ) -> None:
        super().__init__()
        self.batch_size = whole_number(batch_size, "task.data.batch_size")
        eval_batch_size = optional_whole_number(eval_batch_size, "task.data.eval_batch_size")
        self.eval_batch_size = eval_batch_size or self.batch_size
        self.num_workers = whole_number(num_workers, "task.data.num_workers", minimum=0)
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.seed = seed
        self._resume: dict[str, int] | None = None
        self._train_sampler: ResumableSampler | None = None

    def setup(self, stage: str) -> None:
        """Set-up checks every format shares (subclasses that override call this): before fitting, the train
        split must fill one batch on every device, since loaders keep full batches only (`drop_last`)."""
        if stage == TrainerFn.FITTING:
            self.check_train_size(len(self.train_dataset()))

    def check_train_size(self, size: int) -> None:
        """Refuse a train split smaller than one batch per device: the run would take zero steps."""
        world = self.trainer.world_size if self.trainer is not None else 1
        if size // world >= self.batch_size:
            return
        per_device = size // world
        spread = f", {per_device} per device over {world} devices" if world > 1 else ""
        fix = f"lower task.data.batch_size to at most {per_device}" if per_device else "use fewer devices"
        raise ConfigError(
            f"task.data.batch_size={self.batch_size} is larger than the train split at {self.root} "
            f"({size} samples{spread}): training keeps full batches only, so an epoch would take 0 steps; "
            f"{fix}, or add training data"
        )

    def train_dataset(self) -> Dataset:
        raise NotImplementedError

    def val_dataset(self) -> Dataset:
        raise NotImplementedError

    # -- what the task learns from its data (piip.tasks.data.TaskData); formats override what they have ----
    root: Path | None = None
    num_classes: int | None = None
    class_names: list[str] | None = None
    category_ids: list[int] | None = None
    question_source: Any = None

    def ground_truth(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no detection ground truth")

    def prediction_input(self, path: str | Path) -> tuple[Any, Any]:
        """A user's image file as validation would see it, with the target its task needs to draw."""
        raise NotImplementedError(f"{type(self).__name__} does not prepare single images for prediction")

    def fit_to_task(self, **needs: Any) -> None:
        """What the task's model fixes about the data (`PIIPTask.data_needs`); nothing, for most formats."""

    # -- loaders ------------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset()
        sampler = self._train_sampler = self._sampler(len(dataset), train=True)
        if self._resume is not None:
            self._apply_resume(sampler, self._resume)
            self._resume = None
        return self._loader(dataset, sampler, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader:
        dataset = self.val_dataset()
        return self._loader(dataset, self._sampler(len(dataset), train=False), self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        """The test stage evaluates the val split: ImageNet, COCO and ADE20K keep test labels private."""
        return self.val_dataloader()

    def _sampler(self, size: int, train: bool) -> ResumableSampler:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return ResumableSampler(
            size, shuffle=train, seed=self.seed, num_replicas=world, rank=rank, drop_last=train
        )

    def _loader(
        self, dataset: Dataset, sampler: ResumableSampler, batch_size: int, train: bool
    ) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
            drop_last=train,  # full batches only: Mixup needs even sizes, and every rank takes the same steps
            collate_fn=self.collate_fn,
            # its own generator: opening an iterator draws the workers' base seed, which would otherwise come
            # from the global RNG the model's drop-path reads, so a resumed run (which may open one more
            # iterator) would drift; augmentations are seeded per sample (SampleKey), not by that base seed
            generator=torch.Generator().manual_seed(self.seed),
        )

    # -- resuming mid-epoch -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, int]:
        """Where training stands in the data: saved in every checkpoint, applied to the train sampler."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        return {
            "epoch": trainer.current_epoch,
            "batches_done": trainer.fit_loop.epoch_loop.batch_progress.current.processed,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state) if state else None
        # under FSDP the loader already exists (the optimizer's schedule asked for the epoch length first);
        # a loader built later resumes too (the sampler forgets a position of an epoch other than its own)
        if self._resume is not None and self._train_sampler is not None:
            self._apply_resume(self._train_sampler, self._resume)

    def _apply_resume(self, sampler: ResumableSampler, state: dict[str, int]) -> None:
        if state["batch_size"] != self.batch_size:
            log.warning(
                "resuming with batch size %d instead of %d: the interrupted epoch restarts from the start",
                self.batch_size,
                state["batch_size"],
            )
            sampler.resume(state["epoch"], 0)
            return
        # A finished epoch is skipped whole, not replaced by the next one: resuming from an epoch-end
        # checkpoint, Lightning may open that epoch's loader once more before the next (`set_epoch` then moves
        # the sampler on); an empty pass draws no augmentation randomness, a replayed one would shift it.
        sampler.resume(state["epoch"], state["batches_done"] * self.batch_size)
