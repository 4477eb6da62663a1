"""Opening a classification split from whatever `--data` / `--val-data` name: an image folder
or CSV list (moat.data.classification), WebDataset shards (moat.data.shards: a brace pattern,
a folder of .tar files, a list file) or a Hugging Face dataset (moat.data.hf: a save_to_disk
folder, parquet files, `hf:NAME`, `hf:NAME:SPLIT`).

A root holding both splits is read as one: a folder with train/ and val/ (folders, CSV or
shard folders), a folder of `train-*.tar` and `val-*.tar` shards (or splits listed in its
_info.json), a DatasetDict with train and validation splits.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from moat.data import classification, hf
from moat.data.checks import DataError
from moat.data.classification import ImageDataset, Transform
from moat.data.shards import ShardDataset, expand_shards, is_shard_spec, split_shards

log = logging.getLogger("moat")


def open_split(spec: str | os.PathLike, transform: Transform | None = None,
               classes: Sequence[str] | None = None, strict: bool = False, *,
               image_key: str | None = None, label_key: str | None = None,
               split: str = "train") -> ImageDataset:
    """The split `spec` names; `classes` (the training set's) for val. For a dataset with
    several splits, `split` ('train' or 'val') picks one."""
    text = os.fspath(spec)
    if hf.is_hf_spec(text):
        splits = hf.load_splits(text)
        name = ("train" if "train" in splits else None) if split == "train" else \
            hf.val_split(splits)
        if name is None:
            if len(splits) != 1:
                raise classification_error(text, split, sorted(splits))
            name = next(iter(splits))
        return hf.HFDataset(splits[name], transform, classes, strict, source=f"{text}:{name}",
                            image_key=image_key, label_key=label_key)
    if is_shard_spec(text):
        return ShardDataset(expand_shards(text), transform, classes, strict, source=text,
                            image_key=image_key, label_key=label_key)
    return classification.open_split(spec, transform, classes, strict)


def classification_error(spec: str, split: str, names: list[str]) -> DataError:
    hub = hf.hub_name(spec)
    fix = "name the split's own data with --data or --val-data" if not hub else \
        f"name one as hf:NAME:SPLIT, e.g. hf:{hub[0]}:" + next((n for n in names if n != "train"),
                                                             "SPLIT")
    return DataError(f"the dataset {spec!r} has splits {names}, none of them the {split} "
                     f"split; {fix}")


def classification_datasets(
    data: str | os.PathLike,
    val: str | os.PathLike | None = None,
    *,
    train_transform: Transform | None = None,
    val_transform: Transform | None = None,
    strict: bool = False,
    image_key: str | None = None,
    label_key: str | None = None,
) -> tuple[ImageDataset, ImageDataset | None]:
    """Train and val datasets sharing the training set's class indices, from any source."""
    keys = {"image_key": image_key, "label_key": label_key}
    text = os.fspath(data)
    if hf.is_hf_spec(text):
        train = open_split(text, train_transform, None, strict, **keys)
        if val is None:
            splits = hf.load_splits(text)
            val = text if hf.val_split(splits) and len(splits) > 1 else None
            if val is None:
                log.warning("no validation split in %s: training without validation", text)
        return train, None if val is None else \
            open_split(val, val_transform, train.classes, strict, split="val", **keys)
    if Path(text).is_dir() and (both := split_shards(Path(text))):
        train = ShardDataset(both["train"], train_transform, None, strict, split="train",
                             source=f"{text} (train)", **keys)
        if val is None and "val" not in both:
            log.warning("no val shards in %s: training without validation", text)
        if val is not None:
            return train, open_split(val, val_transform, train.classes, strict, split="val",
                                     **keys)
        return train, None if "val" not in both else ShardDataset(
            both["val"], val_transform, train.classes, strict, split="val",
            source=f"{text} (val)", **keys)
    data, val = classification.split_paths(data, val)
    train = open_split(data, train_transform, None, strict, **keys)
    return train, None if val is None else \
        open_split(val, val_transform, train.classes, strict, split="val", **keys)


def eval_dataset(data: str | os.PathLike, transform: Transform | None,
                 classes: Sequence[str] | None, strict: bool, *, image_key: str | None = None,
                 label_key: str | None = None) -> ImageDataset:
    """What `moat eval --data DATA` measures: a root's validation split, or the split itself."""
    keys = {"image_key": image_key, "label_key": label_key}
    text = os.fspath(data)
    path = Path(text)
    if hf.is_hf_spec(text):
        return open_split(text, transform, classes, strict, split="val", **keys)
    if path.is_dir() and (both := split_shards(path)) and "val" in both:
        return ShardDataset(both["val"], transform, classes, strict, split="val",
                            source=f"{text} (val)", **keys)
    for candidate in (path / "val", path / "val.csv"):
        if candidate.exists():
            return open_split(candidate, transform, classes, strict, **keys)
    if path.exists() or is_shard_spec(text):
        return open_split(text, transform, classes, strict, **keys)
    raise FileNotFoundError(f"--data {text!r} does not exist")
