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
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from piip.data.sampling import ResumableSampler
from piip.errors import DataError

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
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.seed = seed
        self._resume: dict[str, int] | None = None
        self._train_sampler: ResumableSampler | None = None

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
        batches_per_epoch = len(sampler) // self.batch_size
        if state["batches_done"] >= batches_per_epoch:
            sampler.resume(state["epoch"] + 1, 0)
        else:
            sampler.resume(state["epoch"], state["batches_done"] * self.batch_size)
