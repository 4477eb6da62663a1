"""Samplers for every task: resumable distributed training order and exact-once evaluation.

The training order depends only on (seed, epoch, rank, world size), so a run resumed
mid-epoch sees exactly the samples the interrupted run would have seen
(`ResumableSampler.skip`); evaluation shards the set without the padding of
DistributedSampler, so every sample counts once (`ShardSampler`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler, Sampler

from moat.errors import InvalidInputError


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
            raise InvalidInputError(f"cannot skip {num_samples} samples of an epoch of "
                                    f"{self.num_samples} on this rank")
        self.start = num_samples

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


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
