"""Unreadable image files, for every task: the `BadSample` a dataset returns in place of a
sample it could not read, the collate helper that sets them apart, and the `BadImageLog` in
which the training loop (and `moat eval`) counts them and logs each path once.

A dataset cannot raise for a bad file without killing the epoch, and it runs in worker
processes: so it returns a BadSample, the collate drops it from the batch and hands it on in
the batch's `bad` field, and the loop reads that field (`moat.train.loaders.track_bad`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

log = logging.getLogger(__name__)


class BadSample(NamedTuple):
    """Returned by a dataset in place of a sample whose file could not be read."""

    path: str
    reason: str


def split_bad(samples: Sequence[Any]) -> tuple[list[Any], list[BadSample]]:
    """(good samples, BadSamples) of a list a DataLoader hands to its collate function; None
    (a padding slot of moat.data.samplers.ExactSampler) is neither."""
    good = [s for s in samples if s is not None and not isinstance(s, BadSample)]
    return good, [s for s in samples if isinstance(s, BadSample)]


class BadImageLog:
    """Counts bad files seen by the training loop and logs each path once (not once per epoch)."""

    def __init__(self, logger: logging.Logger = log) -> None:
        self.logger = logger
        self.count = 0  # every skip, including repeats in later epochs
        self.paths: dict[str, str] = {}

    def add(self, bad: Iterable[BadSample]) -> None:
        for sample in bad:
            self.count += 1
            if sample.path not in self.paths:
                self.paths[sample.path] = sample.reason
                self.logger.warning("skipped bad image: %s", sample.reason)
