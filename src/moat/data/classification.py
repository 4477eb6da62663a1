"""Image classification datasets that survive bad files.

Layouts: an image folder (`root/<class>/<image>`, or `root/train/...` + `root/val/...`) or CSV
file lists (`path,label`). Class indices always come from the training split, so train and val
agree even when val lacks some classes.

Bad files never crash an epoch: `__getitem__` returns a `BadSample` instead of raising, and
`SkipBadCollate` drops those from the batch and returns them alongside it as
`Batch(images, targets, bad)`. That is how the paths get from the worker processes, where they
are found, back to the training loop, which counts and logs them (`moat.data.bad_images`).
With `strict=True` the first bad file raises `BadImageError` naming it instead.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS

from moat.data.bad_images import BadSample, split_bad
from moat.data.folders import class_folders, describe_skipped, walk_files
from moat.data.images import BadImageError, load_rgb
from moat.errors import InvalidInputError
from moat.paths import folder, regular_file
from moat.text import shortlist

log = logging.getLogger(__name__)

Transform = Callable[[Any], Any]
BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class Batch(NamedTuple):
    """What the loaders yield. `images`/`targets` are empty (length 0) if every file was bad."""

    images: torch.Tensor
    targets: torch.Tensor
    bad: list[BadSample]


class _PathTable:
    """Paths packed into one bytes object plus an offsets array.

    A Python list of a million str objects is copied page by page into every forked DataLoader
    worker as reference counts get touched (pytorch/pytorch#13246): gigabytes on ImageNet.
    """

    def __init__(self, paths: Iterable[str]) -> None:
        encoded = [os.fsencode(p) for p in paths]
        self._blob = b"".join(encoded)
        self._offsets = np.cumsum([0] + [len(b) for b in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return os.fsdecode(self._blob[self._offsets[i]:self._offsets[i + 1]])


class ImageDataset(Dataset):
    """(path, class index) samples decoded with `load_rgb`; torchvision ImageFolder attributes.

    `__getitem__` returns (transform(image), target), or a BadSample for an unreadable file
    (or raises BadImageError when `strict`).
    """

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str],
                 transform: Transform | None = None, strict: bool = False) -> None:
        if not samples:
            raise InvalidInputError("dataset has no samples")
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self._paths = _PathTable(p for p, _ in samples)
        self.targets_array = np.fromiter((t for _, t in samples), dtype=np.int64,
                                         count=len(samples))
        self.transform = transform
        self.strict = strict

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def targets(self) -> list[int]:
        return self.targets_array.tolist()

    @property
    def samples(self) -> list[tuple[str, int]]:
        return [(self._paths[i], int(self.targets_array[i])) for i in range(len(self))]

    def path(self, index: int) -> str:
        return self._paths[index]

    def read_image(self, index: int) -> Any:
        """The decoded image of sample `index` (raises BadImageError)."""
        return load_rgb(self._paths[index])

    def __getitem__(self, index: int) -> tuple[Any, int] | BadSample:
        path, target = self.path(index), int(self.targets_array[index])
        try:
            img = self.read_image(index)
        except BadImageError as err:
            if self.strict:
                raise BadImageError(f"{err} (strict mode: turn strict off to skip bad files)",
                                    path) from err
            return BadSample(path, str(err))
        return (self.transform(img) if self.transform else img), target


class ImageFolderDataset(ImageDataset):
    """`root/<class>/**/<image>`; classes are the sorted folder names.

    Pass the training set's `classes` when building val so both use the same indices; val may
    lack classes, but a class folder the training set does not know is an error. Files without
    an image extension (notes.txt, .DS_Store) and hidden files are ignored. Each class folder
    is walked with `moat.data.folders.walk_files`: links never lead out of it or in a loop,
    and entries that are not regular files are skipped, logged and kept in `self.skipped`.
    """

    def __init__(self, root: str | os.PathLike, transform: Transform | None = None,
                 classes: Sequence[str] | None = None, strict: bool = False) -> None:
        self.root = folder(root, "image folder")
        found, self.skipped = class_folders(self.root)
        if not found:
            raise InvalidInputError(f"no class folders in {str(self.root)!r}; expected the layout "
                                    "root/<class name>/<image files>")
        from_train = classes is not None  # val: may lack classes, must not add any
        if classes is None:
            classes = found
        else:
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise InvalidInputError(
                    f"{str(self.root)!r} has class folders the training set does not have: "
                    f"{_short(unknown)}. Class indices come from the training set, so add these "
                    "classes to it or remove the folders.")
        samples = []
        for index, name in enumerate(classes):
            if name not in found:
                continue  # val may lack a class of the training set
            files, skipped = walk_files(self.root / name, IMG_EXTENSIONS)
            if not files and not from_train:
                raise FileNotFoundError(f"class folder {str(self.root / name)!r} has no image "
                                        "files; add images or remove the folder")
            samples += [(path, index) for path in files]
            self.skipped += skipped
        if self.skipped:
            log.warning("skipped %d entr%s under %s: %s", len(self.skipped),
                        "y" if len(self.skipped) == 1 else "ies", self.root,
                        describe_skipped(self.skipped))
        if not samples:
            raise InvalidInputError(f"no image files under {str(self.root)!r} (extensions: "
                                    f"{', '.join(IMG_EXTENSIONS)})")
        super().__init__(samples, classes, transform, strict)


class CsvDataset(ImageDataset):
    """A CSV file list with a header row and columns `path,label` (other columns are ignored).

    Paths are relative to the CSV file's folder (absolute paths also work). Labels are class
    indices if every label in the file is a non-negative integer, else class names. Without
    `classes`, names give sorted(set(names)) and indices give classes '0'..'max'; with `classes`
    (the training set's, for val) names must be among them and indices below their count.
    Listed files must exist (checked here, so a wrong folder fails at once, not as a run of
    'bad' files).
    """

    def __init__(self, csv_path: str | os.PathLike, transform: Transform | None = None,
                 classes: Sequence[str] | None = None, strict: bool = False) -> None:
        self.csv_path = regular_file(csv_path, "CSV file list")
        base = self.csv_path.parent
        paths, labels = [], []
        with open(self.csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in reader.fieldnames or []]
            if "path" not in header or "label" not in header:
                raise InvalidInputError(f"{str(self.csv_path)!r}: the first row must be a header "
                                        f"with columns 'path' and 'label', got {header}")
            reader.fieldnames = header
            for row in reader:
                path, label = (row["path"] or "").strip(), (row["label"] or "").strip()
                if not path and not label:
                    continue
                if not path or not label:
                    raise InvalidInputError(f"{str(self.csv_path)!r} line {reader.line_num}: "
                                            "empty path or label")
                paths.append(os.path.join(base, path))
                labels.append(label)
        if not paths:
            raise InvalidInputError(f"{str(self.csv_path)!r} lists no files")
        targets, classes = targets_from_labels(labels, classes, repr(str(self.csv_path)))
        missing = [p for p in paths if not os.path.isfile(p)]  # FIFOs, devices: not files
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(paths)} files listed in {str(self.csv_path)!r} do not "
                f"exist or are not regular files, e.g. {_short(missing)}; paths must be "
                "relative to the CSV's folder")
        super().__init__(list(zip(paths, targets)), classes, transform, strict)


def targets_from_labels(labels: Sequence[str], classes: Sequence[str] | None, where: str,
                        ) -> tuple[list[int], list[str]]:
    """(class index of each label, class names), the rule for every labelled list (CSV,
    shards, datasets): labels are class indices if every one is a non-negative integer, else
    class names. Without `classes`, names give sorted(set(names)) and indices give classes
    '0'..'max'; with `classes` (the training set's, for val) names must be among them and
    indices below their count. `where` names the data in the errors."""
    if all(label.isdigit() for label in labels):
        targets = [int(label) for label in labels]
        if classes is None:
            return targets, [str(i) for i in range(max(targets) + 1)]
        bad = sorted({t for t in targets if t >= len(classes)})
        if bad:
            raise InvalidInputError(f"{where} has class indices {_short(bad)} but the training set "
                                    f"has only {len(classes)} classes")
        return targets, list(classes)
    if classes is None:
        classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - index.keys())
    if unknown:
        raise InvalidInputError(f"{where} has labels the training set does not have: "
                                f"{_short(unknown)}; class indices come from the training set")
    return [index[label] for label in labels], list(classes)


def _short(items: Sequence[Any]) -> str:
    return shortlist(repr(x) for x in items)


def open_split(path: str | os.PathLike, transform: Transform | None = None,
               classes: Sequence[str] | None = None, strict: bool = False) -> ImageDataset:
    """An image folder or a .csv file list, by what `path` is."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return CsvDataset(path, transform, classes, strict)
    return ImageFolderDataset(path, transform, classes, strict)


def split_paths(data: str | os.PathLike, val: str | os.PathLike | None = None
                ) -> tuple[Path, str | os.PathLike | None]:
    """The training split and the validation split (None: none) that `data` names: a root
    holding `train/` and `val/` folders or `train.csv` and `val.csv`, or the training split
    itself (a folder or a .csv), with `val` given separately or not at all."""
    data = Path(data)
    if data.is_dir():
        for train_name, val_name in (("train", "val"), ("train.csv", "val.csv")):
            if (data / train_name).exists():
                root, data = data, data / train_name
                if val is None and (root / val_name).exists():
                    val = root / val_name
                elif val is None:
                    log.warning("no %s next to %s: training without validation", val_name, data)
                break
    return data, val


def classification_datasets(
    data: str | os.PathLike,
    val: str | os.PathLike | None = None,
    *,
    train_transform: Transform | None = None,
    val_transform: Transform | None = None,
    strict: bool = False,
) -> tuple[ImageDataset, ImageDataset | None]:
    """Train and val datasets of image folders or CSV lists (`split_paths`), sharing the
    training set's class indices. `moat.data.sources` opens every other source."""
    data, val = split_paths(data, val)
    train_set = open_split(data, train_transform, None, strict)
    val_set = None if val is None else open_split(val, val_transform, train_set.classes, strict)
    return train_set, val_set


class SkipBadCollate:
    """Collate that drops BadSamples, returns them in `Batch.bad`, then applies a batch transform.

    A class rather than a function so that `batch_transform` (e.g. MixUpCutMix) pickles to
    workers. Mixing runs in the workers, in parallel, off the training loop's critical path.
    """

    def __init__(self, batch_transform: BatchTransform | None = None) -> None:
        self.batch_transform = batch_transform

    def __call__(self, samples: list[tuple[Any, int] | BadSample]) -> Batch:
        good, bad = split_bad(samples)
        if not good:
            return Batch(torch.empty(0), torch.empty(0, dtype=torch.long), bad)
        images, targets = default_collate(good)
        if self.batch_transform is not None:
            images, targets = self.batch_transform(images, targets)
        return Batch(images, targets, bad)


def scan_for_bad_images(dataset: ImageDataset, num_workers: int = 0,
                        batch_size: int = 64) -> list[BadSample]:
    """Decode every file once and return the bad ones.

    This costs a full decode of the dataset (minutes for ImageNet even with workers), so it is
    an optional upfront check; training skips bad files anyway.
    """
    loader = DataLoader(_DecodeOnly(dataset), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_bad_only)
    return [b for batch in loader for b in batch]


class _DecodeOnly(Dataset):
    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> BadSample | None:
        try:
            self.dataset.read_image(index)
        except BadImageError as err:
            return BadSample(self.dataset.path(index), str(err))
        return None


def _bad_only(items: list[BadSample | None]) -> list[BadSample]:
    return [b for b in items if b is not None]
