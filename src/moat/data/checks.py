"""Refusing classification data that cannot train, before training starts.

`check_classification_splits(train, val)` raises `DataError` with what is wrong and what to do:

* fewer than two classes (a classifier of one class is 100% right and learns nothing);
* a training class without any image (its output would never be trained);
* a split in which no file can be read as an image (every file broken, or not images);
* classes in the validation split that training lacks (refused when the split is opened,
  see moat.data.classification) or training classes the validation split lacks: their
  accuracy could not be measured.

It warns when classes are strongly unbalanced (the largest class has IMBALANCE_RATIO times
the images of the smallest or more): accuracy then mostly measures the large classes.

Readability costs one decode per split when the first file is fine (the usual case).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from moat.data.images import BadImageError
from moat.errors import MoatError
from moat.text import shortlist

log = logging.getLogger("moat")

IMBALANCE_RATIO = 10


class DataError(MoatError, ValueError):
    """Data that cannot train: the message says what is wrong and what to do."""


def check_classification_splits(train, val=None) -> None:
    """Refuse unusable splits (`ImageDataset`s, shards, datasets: `classes`, `targets_array`,
    `read_image(i)`)."""
    where = _where(train)
    counts = np.bincount(train.targets_array, minlength=len(train.classes))
    if len(train.classes) < 2:
        raise DataError(f"the training split {where} has one class ({train.classes[0]!r}): a "
                        "classifier needs at least two, one folder (or CSV label) per class")
    empty = [c for c, n in zip(train.classes, counts) if n == 0]
    if empty:
        raise DataError(f"the training split {where} has no images of class(es) {_names(empty)}; "
                        "add images to them or remove those class folders")
    check_readable(train, "training")
    if val is not None:
        check_readable(val, "validation")
        seen = set(np.unique(val.targets_array).tolist())
        lacking = [c for i, c in enumerate(train.classes) if i not in seen]
        if lacking:
            raise DataError(f"the validation split {_where(val)} has no images of class(es) "
                            f"{_names(lacking)}, which the training split has; add validation "
                            "images of them (or move some training images there)")
    _warn_imbalance(train.classes, counts, where)


def check_readable(dataset, split: str) -> None:
    """Raise DataError unless at least one file of `dataset` decodes as an image."""
    first_error = None
    for i in range(len(dataset)):
        try:
            dataset.read_image(i)
            return
        except BadImageError as err:
            first_error = first_error or err
    raise DataError(f"no file of the {split} split {_where(dataset)} can be read as an image "
                    f"({len(dataset)} tried; the first: {first_error}); check that the folder "
                    "holds image files (JPEG, PNG, ...)")


def _warn_imbalance(classes: Sequence[str], counts: np.ndarray, where: str) -> None:
    big, small = int(np.argmax(counts)), int(np.argmin(counts))
    if counts[big] >= IMBALANCE_RATIO * counts[small]:
        log.warning("the classes of %s are strongly unbalanced: %r has %d images, %r has %d "
                    "(%.0f:1); accuracy will mostly reflect the large classes, so look at the "
                    "per-class accuracy, and add images of the small classes if you can",
                    where, classes[big], counts[big], classes[small], counts[small],
                    counts[big] / counts[small])


def _where(dataset) -> str:
    return repr(str(getattr(dataset, "root", None) or getattr(dataset, "csv_path", "")
                    or getattr(dataset, "source", "")))


def _names(names: Sequence[str]) -> str:
    return shortlist((repr(x) for x in names), 8)
