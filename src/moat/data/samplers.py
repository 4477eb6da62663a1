"""Samplers for every task: resumable distributed training order and exact-once evaluation.

The training order depends only on (seed, epoch, rank, world size), so a run resumed
mid-epoch sees exactly the samples the interrupted run would have seen
(`ResumableSampler.skip`); evaluation shards the set without the padding of
DistributedSampler, so every sample counts once (`ShardSampler`).

`ExactSampler` (shards and Hugging Face datasets) trains every sample exactly once per epoch
over all ranks and loader workers, in a new seeded order each epoch that keeps reads local to a
few shards at a time; every rank takes the same number of steps, its last micro-batches made
short (or empty) by padding slots (index -1) that the collate drops, and never left with a
single image when a micro-batch holds 3 or more. The rule where exactness cannot hold: with
micro-batches of 1 or 2 images, a micro-batch left with a single image is skipped (BatchNorm
cannot normalise one image; moat.train.loop); an unreadable image is skipped. Both are counted:
the epoch's `train_samples` falls short of the set's size by them.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

import numpy as np

import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler, Sampler


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ResumableSampler(DistributedSampler):
    """DistributedSampler (also used on one process) that can start part-way into an epoch.

    The order depends only on (seed, epoch, rank, world size), so a resumed run that skips the
    batches it already trained on sees exactly the samples the interrupted run would have seen.
    `set_epoch` resets the skip, so only the epoch that was interrupted is shortened.
    """

    def __init__(self, dataset: Dataset, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, num_replicas: int | None = None,
                 rank: int | None = None) -> None:
        world, this_rank = _world()
        super().__init__(dataset, num_replicas=world if num_replicas is None else num_replicas,
                         rank=this_rank if rank is None else rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.start = 0

    def skip(self, num_samples: int) -> None:
        """Start this epoch at the `num_samples`-th index of this rank's order."""
        if not 0 <= num_samples <= self.num_samples:
            raise ValueError(f"cannot skip {num_samples} samples of an epoch of "
                             f"{self.num_samples} on this rank")
        self.start = num_samples

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(self._indices(), self.start, None)

    def _indices(self) -> Iterator[int]:
        """This rank's whole epoch, before the skip."""
        return DistributedSampler.__iter__(self)

    def __len__(self) -> int:
        return self.num_samples - self.start


PAD = -1  # an ExactSampler slot without a sample


class ExactSampler(ResumableSampler):
    """Each of the dataset's samples exactly once per epoch over all ranks, each rank taking
    `steps * accum_steps` micro-batches of `batch_size` slots, the same on every rank.

    The epoch's order: the shards (`shard_sizes`, samples of shard k following those of k-1;
    one shard when None) in a permutation seeded by (seed, epoch), then the samples shuffled
    within windows of `window` consecutive shards, so each loader worker reads a few shards at
    a time. Rank r takes the r-th contiguous block of that order (blocks differ by at most one
    sample, so each rank reads its own shards), then PAD slots up to the common length.
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, accum_steps: int = 1, seed: int = 0,
                 shard_sizes: Sequence[int] | None = None, window: int = 4,
                 num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, shuffle=True, seed=seed, num_replicas=num_replicas, rank=rank)
        self.size = len(dataset)  # type: ignore[arg-type]
        self.shard_sizes = list(shard_sizes) if shard_sizes else [self.size]
        if sum(self.shard_sizes) != self.size:
            raise ValueError(f"shard sizes sum to {sum(self.shard_sizes)}, not {self.size}")
        self.window = window
        self.batch_size = batch_size
        per_step = self.num_replicas * batch_size * accum_steps
        self.num_samples = math.ceil(self.size / per_step) * batch_size * accum_steps
        self.total_size = self.num_samples * self.num_replicas

    def epoch_order(self) -> np.ndarray:
        """All samples in this epoch's order (the same on every rank)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        starts = np.cumsum([0] + self.shard_sizes)
        shards = rng.permutation(len(self.shard_sizes))
        parts = []
        for w in range(0, len(shards), self.window):
            chunk = np.concatenate([np.arange(starts[k], starts[k + 1])
                                    for k in shards[w:w + self.window]])
            parts.append(rng.permutation(chunk))
        return np.concatenate(parts)

    def _indices(self) -> Iterator[int]:
        share, extra = divmod(self.size, self.num_replicas)
        start = self.rank * share + min(self.rank, extra)
        mine = self.epoch_order()[start:start + share + (self.rank < extra)].tolist()
        pads = self.num_samples - len(mine)
        if len(mine) % self.batch_size == 1 and len(mine) > self.batch_size >= 3:
            # the last micro-batch would hold one image: move a padding slot into the batch
            # before it, which keeps batch_size - 1 images, and the last one two
            mine, pads = mine[:-2] + [PAD] + mine[-2:], pads - 1
        return iter(mine + [PAD] * pads)


class ExactEpochSampler(ExactSampler):
    """ExactSampler yielding (epoch, index), as EpochSampler does."""

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        return ((self.epoch, i) for i in super().__iter__())


class ShardSampler(Sampler[int]):
    """Rank r of n takes indices r, r+n, r+2n, ...: no padding, unlike DistributedSampler.

    DistributedSampler repeats samples so all ranks have equal counts, which skews validation
    metrics; with this sampler each sample is evaluated exactly once (ranks may differ by one
    sample, so sum correct/total counts across ranks with all_reduce).
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None,
                 rank: int | None = None) -> None:
        world, this_rank = _world()
        self.length = len(dataset)  # type: ignore[arg-type]
        self.num_replicas = world if num_replicas is None else num_replicas
        self.rank = this_rank if rank is None else rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))


class EpochSampler(ResumableSampler):
    """ResumableSampler yielding (epoch, index) so the dataset can seed per sample."""

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        return ((self.epoch, i) for i in super().__iter__())
