"""Resumable sampling and per-sample augmentation RNG (what makes mid-epoch resume exact)."""

from __future__ import annotations

import random

import numpy as np
import torch

from piip.data.sampling import ResumableSampler, SampleKey, SeededTransform


def indices(sampler: ResumableSampler) -> list[int]:
    return [key.index for key in sampler]


def test_shuffle_depends_on_seed_and_epoch_only():
    a, b = ResumableSampler(50, shuffle=True, seed=1), ResumableSampler(50, shuffle=True, seed=1)
    torch.manual_seed(123)  # the global RNG must not matter
    first = indices(a)
    torch.manual_seed(456)
    assert indices(b) == first
    assert sorted(first) == list(range(50)) and first != list(range(50))
    a.set_epoch(1)
    assert indices(a) != first
    assert indices(ResumableSampler(50, shuffle=True, seed=2)) != first


def test_ranks_get_disjoint_equal_shards_covering_the_data():
    shards = [indices(ResumableSampler(10, shuffle=True, seed=0, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]  # padded by repeating to equal counts
    assert set().union(*shards) == set(range(10))
    dropped = [
        indices(ResumableSampler(10, shuffle=True, seed=0, num_replicas=3, rank=r, drop_last=True))
        for r in range(3)
    ]
    assert [len(s) for s in dropped] == [3, 3, 3] and len(set().union(*dropped)) == 9


def test_resume_skips_the_consumed_part_of_its_epoch_only():
    full = ResumableSampler(20, shuffle=True, seed=0)
    full.set_epoch(3)
    order = indices(full)
    resumed = ResumableSampler(20, shuffle=True, seed=0)
    resumed.resume(epoch=3, samples_done=8)
    resumed.set_epoch(3)  # Lightning calls set_epoch after the resume: the skip survives for that epoch
    keys = list(resumed)
    assert [k.index for k in keys] == order[8:]
    assert {k.epoch for k in keys} == {3}
    assert indices(resumed) == order  # the skip applies once
    other = ResumableSampler(20, shuffle=True, seed=0)
    other.resume(epoch=3, samples_done=8)
    other.set_epoch(4)
    assert len(indices(other)) == 20


class Items:
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[int, int]:
        return index, index % 2


def noisy(value: int) -> tuple[float, float, float]:
    """A transform drawing from all three global RNGs, like timm's augmentations do."""
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_augmentation_is_a_function_of_seed_epoch_and_index_and_leaves_global_rngs_alone():
    dataset = SeededTransform(Items(), noisy, seed=7)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    first = dataset[SampleKey(2, 5)]
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    assert dataset[SampleKey(2, 5)] == first
    assert dataset[SampleKey(2, 6)][0] != first[0]
    assert dataset[SampleKey(3, 5)][0] != first[0]
    assert SeededTransform(Items(), noisy, seed=8)[SampleKey(2, 5)][0] != first[0]
