"""DataLoaders for any task: resumable distributed sampling and per-sample seeded augmentation.

Augmentation randomness is a pure function of (seed, epoch, sample index): before each sample
the Python, NumPy and torch generators are seeded from those three numbers. So a run resumed
mid-epoch sees exactly the crops and flips the interrupted run would have seen, whatever the
number of workers, and two runs with the same seed augment identically. The sampler's order
depends only on (seed, epoch, rank, world size) (`moat.data.samplers`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from moat.data.bad_images import BadImageLog, BadSample
from moat.data.samplers import (PAD, EpochSampler, ExactEpochSampler, ResumableSampler,
                                ShardSampler)


class SeededDataset(Dataset):
    """Wraps a dataset: item (epoch, index) is dataset[index] with all RNGs seeded from
    (seed, epoch, index). In the main process (workers=0) the RNG states are restored after,
    so the training loop's own random stream is untouched."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        epoch, index = item
        if index == PAD:
            return None  # an ExactSampler slot without a sample: the collate drops it
        in_main = torch.utils.data.get_worker_info() is None
        if in_main:
            saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        seeds = np.random.SeedSequence([self.seed, epoch, index]).generate_state(2)
        random.seed(int(seeds[0]))
        np.random.seed(int(seeds[1]))
        torch.manual_seed(int(seeds[0]) << 32 | int(seeds[1]))
        try:
            return self.dataset[index]
        finally:
            if in_main:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


def train_loader(dataset: Dataset, batch_size: int, *, collate_fn: Callable | None, workers: int,
                 seed: int, pin_memory: bool, accum_steps: int = 1) -> DataLoader:
    """Per-process batches of `batch_size`, shuffled per epoch. A dataset marked
    `exact_epochs` (shards, Hugging Face datasets) gets every sample once per epoch
    (`ExactEpochSampler`, in shard order when it has `shard_sizes()`); others drop the
    incomplete last batch."""
    if getattr(dataset, "exact_epochs", False):
        sizes = dataset.shard_sizes() if hasattr(dataset, "shard_sizes") else None
        sampler: ResumableSampler = ExactEpochSampler(
            dataset, batch_size=batch_size, accum_steps=accum_steps, seed=seed,
            shard_sizes=sizes)
    else:
        sampler = EpochSampler(dataset, shuffle=True, seed=seed, drop_last=True)
    return DataLoader(SeededDataset(dataset, seed), batch_size=batch_size, sampler=sampler,
                      drop_last=True, collate_fn=collate_fn, num_workers=workers,
                      pin_memory=pin_memory, persistent_workers=workers > 0,
                      prefetch_factor=4 if workers > 0 else None,
                      generator=torch.Generator().manual_seed(seed))


def eval_loader(dataset: Dataset, batch_size: int, *, collate_fn: Callable | None, workers: int,
                pin_memory: bool) -> DataLoader:
    """Each sample exactly once over all processes (no padding)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(dataset),
                      collate_fn=collate_fn, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0)


def set_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    sampler = loader.sampler
    assert isinstance(sampler, ResumableSampler)
    sampler.set_epoch(epoch)
    if skip_batches:
        sampler.skip(min(skip_batches * (loader.batch_size or 1), sampler.num_samples))


def full_batches(loader: DataLoader) -> int:
    """Batches per epoch on this process, ignoring any skip."""
    return loader.sampler.num_samples // loader.batch_size  # type: ignore[union-attr]


def readable_batch(loader: DataLoader, epoch: int) -> Any:
    """A full batch of `loader`'s shape from the first readable samples of its dataset (in
    index order, augmented as in `epoch`): what a process whose own batch had no image to
    train on runs instead in a distributed run (moat.train.loop)."""
    dataset = loader.dataset  # a SeededDataset: items are (epoch, index)
    good = []
    for index in range(len(dataset)):  # type: ignore[arg-type]
        sample = dataset[(epoch, index)]
        if not isinstance(sample, BadSample):
            good.append(sample)
            if len(good) == loader.batch_size:
                return loader.collate_fn(good)  # type: ignore[misc]
    raise ValueError(f"the training data has fewer than {loader.batch_size} readable images, "
                     "the batch size of one process")


def track_bad(batches: Iterable[Any], log: BadImageLog) -> Iterable[Any]:
    """Pass batches through, recording the files a collate skipped (`batch.bad`); iterable
    again as often as `batches` is."""
    return _Tracked(batches, log)


class _Tracked:
    def __init__(self, batches: Iterable[Any], log: BadImageLog) -> None:
        self.batches, self.log = batches, log

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            bad = getattr(batch, "bad", None)
            if bad:
                self.log.add(bad)
            yield batch
