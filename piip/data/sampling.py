"""Reproducible, resumable sampling and augmentation.

Two properties make a run interrupted mid-epoch and resumed from `last` end exactly like an uninterrupted
one (and make augmentation independent of `num_workers`):

* `ResumableSampler` shuffles per epoch from `(seed, epoch)`, shards across ranks, and can start an epoch
  part-way, skipping the samples already trained on.
* `SeededTransform` draws each sample's augmentation from its own RNG seeded by `(seed, epoch, index)`,
  leaving the global RNGs (which drive dropout, drop-path and Mixup) untouched.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


class SampleKey(NamedTuple):
    """What the sampler yields: the dataset index and the epoch it is drawn for."""

    index: int
    epoch: int


class ResumableSampler(Sampler[SampleKey]):
    """Per-epoch shuffle (like `DistributedSampler`), sharded by rank, resumable mid-epoch."""

    def __init__(
        self,
        dataset_size: int,
        *,
        shuffle: bool,
        seed: int,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        self.dataset_size = dataset_size
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.epoch = 0
        self._skip = 0  # samples of `self.epoch` (on this rank) already consumed before a resume
        self._lengths: list[int] | None = None
        self._group_size = 0

    def group_by(self, lengths: list[int], group_size: int) -> None:
        """Sort every run of `group_size` shuffled samples by length (longest first), so the batches cut
        from it (one per rank) pad little; the order stays a function of (seed, epoch), hence resumable."""
        if len(lengths) != self.dataset_size:
            raise ValueError(f"group_by: {len(lengths)} lengths for {self.dataset_size} samples")
        self._lengths, self._group_size = list(lengths), max(int(group_size), 1)

    def __len__(self) -> int:
        if self.drop_last:
            return self.dataset_size // self.num_replicas
        return math.ceil(self.dataset_size / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start; a pending resume only applies to its own epoch."""
        if epoch != self.epoch:
            self._skip = 0
        self.epoch = epoch

    def resume(self, epoch: int, samples_done: int) -> None:
        self.epoch = epoch
        self._skip = samples_done

    def __iter__(self) -> Iterator[SampleKey]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        if self._lengths is not None:
            lengths, size = self._lengths, self._group_size
            groups = [order[i : i + size] for i in range(0, len(order), size)]
            order = [j for group in groups for j in sorted(group, key=lambda k: -lengths[k])]
        total = len(self) * self.num_replicas
        if total > len(order):  # pad by repeating, so every rank gets the same count
            order += (order * math.ceil(total / len(order)))[: total - len(order)]
        shard = order[:total][self.rank :: self.num_replicas]
        skip, self._skip = self._skip, 0
        epoch = self.epoch
        return (SampleKey(i, epoch) for i in shard[skip:])


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch (CPU) RNGs for a block, then restore them."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededTransform(Dataset):
    """Wraps a dataset of `(image, target)` so that `dataset[SampleKey]` augments reproducibly."""

    def __init__(
        self,
        dataset: Any,
        transform: Callable,
        seed: int,
        random_transform: bool = True,
        pairwise: bool = False,
    ) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.random_transform = random_transform
        self.pairwise = pairwise  # transform(image, target) -> (image, target), e.g. a flip that moves boxes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey | int) -> tuple[Any, Any]:
        index, epoch = (key.index, key.epoch) if isinstance(key, SampleKey) else (int(key), 0)
        image, target = self.dataset[index]
        if not self.random_transform:
            return self._apply(image, target)
        seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        with isolated_rng(seed):
            return self._apply(image, target)

    def _apply(self, image: Any, target: Any) -> tuple[Any, Any]:
        return self.transform(image, target) if self.pairwise else (self.transform(image), target)
