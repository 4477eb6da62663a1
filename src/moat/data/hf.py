"""Hugging Face datasets as classification datasets: a `save_to_disk` folder, parquet files, or
a dataset name read through the `datasets` cache (`hf:NAME` or timm's `hfds/NAME`, one split of
it with `hf:NAME:SPLIT`).

A name is opened with `datasets.load_dataset(NAME)`. Online, `datasets` asks the Hub for the
repository's current commit and reuses the Arrow files that an earlier load of that commit
left in its cache (`$HF_DATASETS_CACHE/NAMESPACE___NAME/CONFIG/VERSION/COMMIT/`), or downloads
and prepares them. Offline (HF_HUB_OFFLINE=1 or HF_DATASETS_OFFLINE=1, or when the Hub cannot
be reached), it reads the newest of those folders: nothing is downloaded, and a name that was
never loaded online is a DataError.

The image and label columns are named (`image_key`, `label_key`) or found: the first column
of the `Image` feature type (else one named image/img/jpg/png), the first `ClassLabel` column
(else one named label/labels/cls/target). Class names come from the `ClassLabel` feature, else
from the labels (moat.data.classification `targets_from_labels`). Images are decoded by
moat (`decode_rgb`), not by `datasets`, so an undecodable row is a BadSample the training loop
counts and names, as a bad file in a folder is.

`datasets` is imported when a dataset is opened: it is heavy (pyarrow, pandas) and only these
users need it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moat.data.checks import DataError
from moat.data.classification import ImageDataset, Transform, targets_from_labels
from moat.data.images import decode_rgb, load_rgb

HUB_PREFIXES = ("hf:", "hfds/")
IMAGE_NAMES = ("image", "img", "jpg", "png", "webp")
LABEL_NAMES = ("label", "labels", "cls", "target", "fine_label")
VAL_SPLITS = ("validation", "val", "valid")


def is_hf_spec(spec: str | os.PathLike) -> bool:
    text = os.fspath(spec)
    path = Path(text)
    return (text.startswith(HUB_PREFIXES) or text.endswith(".parquet")
            or (path.is_dir() and any((path / f).is_file() for f in
                                      ("dataset_dict.json", "state.json")))
            or (path.is_dir() and any(path.glob("*.parquet"))))


def load_splits(spec: str | os.PathLike) -> dict[str, Any]:
    """{split name: datasets.Dataset} of what `spec` names."""
    import datasets  # heavy; see the module docstring

    text = os.fspath(spec)
    path = Path(text)
    hub = hub_name(text)
    try:
        if hub:
            loaded = _load_name(hub[0], str(datasets.config.HF_DATASETS_CACHE))
        elif path.is_dir() and ((path / "dataset_dict.json").is_file()
                                or (path / "state.json").is_file()):
            loaded = datasets.load_from_disk(text)
        else:
            files = sorted(str(p) for p in path.glob("*.parquet")) if path.is_dir() else [text]
            loaded = datasets.load_dataset("parquet", data_files={"train": files})
    except (FileNotFoundError, ConnectionError) as err:  # offline: the Hub is "unreachable"
        fix = "" if not hub else (
            f" (load it once where there is network, with the same HF_DATASETS_CACHE: python -c "
            f"\"import datasets; datasets.load_dataset('{hub[0]}')\")")
        raise DataError(f"no Hugging Face dataset at {text!r} ({err}); a name must be in the "
                        f"datasets cache, {datasets.config.HF_DATASETS_CACHE}{fix}") from err
    except ValueError as err:  # e.g. several configurations of a name in the cache
        fix = ("\nmoat reads a name's only configuration; for one of several, save it once "
               "with datasets.load_dataset(NAME, CONFIG).save_to_disk(DIR) and pass --data DIR"
               if hub else "")
        raise DataError(f"the datasets package cannot open {text!r}: {err}{fix}") from err
    splits = {"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)
    if hub and hub[1] is not None:
        if hub[1] not in splits:
            raise DataError(f"the dataset {hub[0]!r} has no split {hub[1]!r}; its splits are "
                            f"{sorted(splits)}")
        return {hub[1]: splits[hub[1]]}
    return splits


@functools.lru_cache(maxsize=8)
def _load_name(name: str, cache: str) -> Any:
    """`load_dataset(name)` once per process and cache: a run opens its data several times,
    and online every load asks the Hub for the repository's commit."""
    import datasets

    return datasets.load_dataset(name)


def hub_name(text: str) -> tuple[str, str | None] | None:
    """(dataset name, split or None) of `hf:NAME[:SPLIT]` / `hfds/NAME[:SPLIT]`, else None."""
    for prefix in HUB_PREFIXES:
        if text.startswith(prefix):
            name, _, split = text[len(prefix):].partition(":")
            return name, split or None
    return None


class HFDataset(ImageDataset):
    """One split of a Hugging Face dataset with `ImageDataset`'s interface."""

    exact_epochs = True  # trained with moat.data.samplers.ExactSampler

    def __init__(self, table: Any, transform: Transform | None = None,
                 classes: Sequence[str] | None = None, strict: bool = False, *, source: str,
                 image_key: str | None = None, label_key: str | None = None) -> None:
        import datasets

        self.source = source
        where = f"the dataset {source!r}"
        features = table.features
        image = image_key or _find(features, datasets.Image, IMAGE_NAMES)
        label = label_key or _find(features, datasets.ClassLabel, LABEL_NAMES)
        for role, column, flag in (("image", image, "image_key"), ("label", label, "label_key")):
            if column is None or column not in features:
                raise DataError(f"{where} has no {role} column"
                                f"{'' if column is None else f' {column!r}'}; its columns are "
                                f"{list(features)}: name it with --set {flag}=COLUMN")
        if isinstance(features[label], datasets.ClassLabel) and classes is None:
            classes = features[label].names
        values = [str(v) for v in table[label]]  # ClassLabel: indices into its names
        if not values:
            raise DataError(f"{where} has no rows")
        targets, self.classes = targets_from_labels(values, classes, where)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.targets_array = np.array(targets, dtype=np.int64)
        if isinstance(features[image], datasets.Image):
            table = table.cast_column(image, datasets.Image(decode=False))
        self.table = table.select_columns([image])
        self.image_column = image
        self.transform = transform
        self.strict = strict

    def __len__(self) -> int:
        return len(self.targets_array)

    def path(self, index: int) -> str:
        return f"{self.source}[{index}]"

    def read_image(self, index: int) -> Any:
        value = self.table[int(index)][self.image_column]
        if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
            return load_rgb(value["path"])
        data = value.get("bytes") if isinstance(value, dict) else value
        return decode_rgb(data or b"", self.path(index))


def _find(features: Any, kind: type, names: Sequence[str]) -> str | None:
    typed = [name for name, feature in features.items() if isinstance(feature, kind)]
    if typed:
        return typed[0]
    return next((n for n in names if n in features), None)


def val_split(splits: dict[str, Any]) -> str | None:
    return next((s for s in VAL_SPLITS if s in splits), None)
