"""WebDataset tar shards as an indexed classification dataset, and the shard index's one owner.

Shards are named by a brace pattern (`shards/train-{000000..000127}.tar`), a folder of `.tar`
files or a list file (one shard per line, relative to the list's folder). A sample is the
files of one key, as img2dataset, timm and `webdataset.ShardWriter` write them: the image under
`jpg`/`jpeg`/`png`/`webp` (or `image_key`), the label under `cls` (text: a class index or a
name) or as a field of a `json` member (`label` unless `label_key` names another).

Random access, not a stream: each shard is opened with `wids` (memory-mapped, indexed by its
tar headers), so a sample is (shard, position in the shard) and any sampler can order the
samples; that is what makes an epoch exact over ranks and workers (moat.data.samplers
`ExactSampler`) and a resumed run start mid-epoch exactly where it stopped.

What a split holds comes from its index: the label of every sample of every shard, built by
reading the shards' small label members once and cached beside them (`_moat_index.json`,
written atomically; `~/.cache/moat/shard-index/` when that folder is read-only), keyed by each
shard's size and modification time, so a changed shard is read again. Class names come from an
`_info.json` beside the shards (timm's layout: `splits.<split>.filenames/shard_lengths/
num_samples`, plus `class_names`), else from the labels (moat.data.classification
`targets_from_labels`). A shard whose sample count differs from `_info.json` is reported.

Faults: a shard that cannot be indexed (garbage, not a tar) is skipped and reported with its
name (and its sample count when `_info.json` has it); a truncated shard keeps its complete
samples; a sample whose image cannot be decoded is a BadSample the training loop counts and
names; a sample without a label is left out and counted. A missing shard, an empty pattern,
a label outside the training set's classes and an image or label key no sample has are
`DataError`s before training starts.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
from webdataset import TarWriter
from wids.wids import IndexedTarSamples, splitname

from moat.data.checks import DataError
from moat.data.classification import ImageDataset, Transform, targets_from_labels
from moat.data.images import decode_rgb, load_rgb
from moat.atomic import atomic_write_text

log = logging.getLogger("moat")

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
INFO_NAMES = ("_info.json", "info.json")
INDEX_NAME = "_moat_index.json"
INDEX_VERSION = 1
LIST_SUFFIXES = (".txt", ".shards", ".list")
OPEN_SHARDS = 8  # shards each process keeps open (mmapped): a shuffle window's worth


# --- naming shards ---------------------------------------------------------------------------

def is_shard_spec(spec: str | os.PathLike) -> bool:
    """Whether `spec` names tar shards: a pattern or file ending in .tar, a list file, or a
    folder holding .tar files directly."""
    text = os.fspath(spec)
    if text.endswith(".tar") or ("{" in text and ".tar" in text):
        return True
    path = Path(text)
    if path.suffix in LIST_SUFFIXES and path.is_file():
        return True
    return path.is_dir() and any(path.glob("*.tar"))


def expand_shards(spec: str | os.PathLike) -> list[Path]:
    """The shard files `spec` names, in order; DataError for an empty pattern or folder, or a
    shard that does not exist."""
    text = os.fspath(spec)
    path = Path(text)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        what = f"folder {text!r}"
    elif path.suffix in LIST_SUFFIXES and path.is_file():
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        shards = [path.parent / ln for ln in lines if ln and not ln.startswith("#")]
        what = f"list file {text!r}"
    else:
        shards = [Path(p) for p in braceexpand.braceexpand(text)]
        what = f"pattern {text!r}"
    if not shards:
        raise DataError(f"the shard {what} names no .tar file; check the path")
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise DataError(f"{len(missing)} of the {len(shards)} shards of the {what} do not exist, "
                        f"e.g. {missing[0]!r}; check the pattern's range and the folder")
    return shards


# --- the index -------------------------------------------------------------------------------

@dataclass
class ShardIndex:
    """Per shard: the label of each sample (None: no label), or why it could not be read."""

    shards: list[Path]
    labels: list[list[str | None] | None]  # None: the shard could not be indexed
    errors: list[str | None]


def read_info(folder: Path) -> dict[str, Any]:
    for name in INFO_NAMES:
        if (folder / name).is_file():
            return json.loads((folder / name).read_text(encoding="utf-8"))
    return {}


def build_index(shards: Sequence[Path], label_key: str | None) -> ShardIndex:
    """The labels of every sample of `shards`, from the cache where a shard is unchanged."""
    labels, errors = [], []
    caches: dict[Path, dict[str, Any]] = {}
    for shard in shards:
        cache = caches.setdefault(shard.parent, _load_cache(shard.parent, label_key))
        stat = shard.stat()
        entry = cache["shards"].get(shard.name)
        if not (entry and entry["size"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns):
            entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, **_scan(shard, label_key)}
            cache["shards"][shard.name] = entry
            cache["dirty"] = True
        labels.append(entry.get("labels"))
        errors.append(entry.get("error"))
    for folder, cache in caches.items():
        if cache.pop("dirty", False):
            _save_cache(folder, cache)
    return ShardIndex(list(shards), labels, errors)


def _scan(shard: Path, label_key: str | None) -> dict[str, Any]:
    """{'labels': [...]} of one shard, or {'error': reason} when it cannot be indexed."""
    try:
        samples = IndexedTarSamples(path=str(shard))
    except Exception as err:  # noqa: BLE001 - whatever a damaged tar makes wids raise
        return {"error": f"{type(err).__name__}: {err}"}
    try:
        return {"labels": [_label(samples[i], label_key) for i in range(len(samples))]}
    except Exception as err:  # noqa: BLE001
        return {"error": f"{type(err).__name__}: {err}"}
    finally:
        samples.close()


def _label(sample: dict[str, Any], label_key: str | None) -> str | None:
    """The label of a wids sample ({'.cls': BytesIO, ...}) as text, or None."""
    member = sample.get("." + (label_key or "cls"))
    if member is not None:
        text = member.getvalue().decode("utf-8", "replace").strip()
        return text or None
    if ".json" in sample:
        try:
            value = json.loads(sample[".json"].getvalue()).get(label_key or "label")
        except (ValueError, AttributeError):
            return None
        return None if value is None else str(value)
    return None


def _cache_file(folder: Path) -> Path:
    if os.access(folder, os.W_OK):
        return folder / INDEX_NAME
    digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "moat" / "shard-index" / f"{digest}.json"


def _load_cache(folder: Path, label_key: str | None) -> dict[str, Any]:
    empty = {"version": INDEX_VERSION, "label_key": label_key, "shards": {}}
    try:
        cache = json.loads(_cache_file(folder).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return empty
    if cache.get("version") != INDEX_VERSION or cache.get("label_key") != label_key:
        return empty
    return cache


def _save_cache(folder: Path, cache: dict[str, Any]) -> None:
    path = _cache_file(folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(cache))
    except OSError as err:  # a read-only cache costs time, not correctness
        log.warning("could not cache the shard index in %s (%s)", path, err)


# --- the dataset -----------------------------------------------------------------------------

class ShardDataset(ImageDataset):
    """The samples of WebDataset shards: `ImageDataset`'s interface (`classes`,
    `targets_array`, `path(i)` = 'shard.tar:key', `read_image(i)`), read by random access."""

    exact_epochs = True  # trained with moat.data.samplers.ExactSampler

    def __init__(self, shards: Sequence[Path], transform: Transform | None = None,
                 classes: Sequence[str] | None = None, strict: bool = False, *, source: str,
                 image_key: str | None = None, label_key: str | None = None,
                 split: str | None = None) -> None:
        self.source = source  # what the user named: errors and reports quote it
        self.shards = list(shards)
        self.image_key = image_key
        info = read_info(self.shards[0].parent)
        index = build_index(self.shards, label_key)
        self._report(index, info, split)
        where = f"the shards {self.source!r}"
        rows = [(s, i, label) for s, labels in enumerate(index.labels) if labels
                for i, label in enumerate(labels) if label is not None]
        unlabelled = sum(1 for labels in index.labels if labels for x in labels if x is None)
        if unlabelled:
            log.warning("%d sample(s) of %s have no %s label: left out", unlabelled, where,
                        f"'{label_key}'" if label_key else "'cls' or json 'label'")
        if not rows:
            raise DataError(f"no labelled sample in {where}: each sample needs its label under "
                            "'cls' or in a 'json' member ('label', or set label_key)")
        if classes is None and info.get("class_names"):
            classes = list(info["class_names"])
        targets, self.classes = targets_from_labels([r[2] for r in rows], classes, where)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.shard_of = np.array([r[0] for r in rows], dtype=np.int32)
        self.offset_in_shard = np.array([r[1] for r in rows], dtype=np.int32)
        self.targets_array = np.array(targets, dtype=np.int64)
        self.transform = transform
        self.strict = strict
        self._open: OrderedDict[int, IndexedTarSamples] = OrderedDict()
        self._check_image_key()

    def _report(self, index: ShardIndex, info: dict[str, Any], split: str | None) -> None:
        lengths = _info_lengths(info, split)
        for shard, labels, error in zip(index.shards, index.labels, index.errors):
            expected = lengths.get(shard.name)
            if error is not None:
                lost = f"{expected} samples" if expected is not None else "its samples"
                log.warning("skipped damaged shard %s (%s): %s left out", shard, error, lost)
            elif expected is not None and labels is not None and len(labels) != expected:
                log.warning("shard %s holds %d samples, %s says %d: truncated or rewritten; "
                            "training on the %d it holds", shard, len(labels),
                            INFO_NAMES[0], expected, len(labels))
        self.damaged = [str(s) for s, e in zip(index.shards, index.errors) if e is not None]

    def _check_image_key(self) -> None:
        members = self._entry(0)[2]
        if self.image_key is not None and self.image_key not in members:
            raise DataError(f"the shards {self.source!r} have no '{self.image_key}' member "
                            f"(image_key); the first sample has {', '.join(members)}")
        if self.image_key is None and not any(k in members for k in IMAGE_KEYS):
            raise DataError(f"the first sample of {self.source!r} has no image under "
                            f"{', '.join(IMAGE_KEYS)} (it has {', '.join(members)}); name the "
                            "image member with image_key")

    def __len__(self) -> int:
        return len(self.targets_array)

    def path(self, index: int) -> str:
        return f"{self.shards[self.shard_of[index]]}:{self._entry(index)[1]}"

    def member(self, index: int, name: str) -> bytes | None:
        """The bytes of member `name` ('jpg', 'cls', ...) of sample `index`, or None."""
        tar, _, members = self._entry(index)
        return None if name not in members else tar.reader.get_at_index(members[name])[1]

    def read_image(self, index: int) -> Any:
        tar, key, members = self._entry(index)
        keys = [self.image_key] if self.image_key else IMAGE_KEYS
        found = next((members[k] for k in keys if k in members), None)
        data = b"" if found is None else tar.reader.get_at_index(found)[1]
        return decode_rgb(data, f"{self.shards[self.shard_of[index]]}:{key}")

    def _entry(self, index: int) -> tuple[IndexedTarSamples, str, dict[str, int]]:
        """(the open shard, the sample's key, {member name: its number in the tar}) of sample
        `index`; only the members read are copied out of the mapped shard."""
        shard = int(self.shard_of[index])
        if shard not in self._open:
            if len(self._open) >= OPEN_SHARDS:
                self._open.popitem(last=False)[1].close()
            self._open[shard] = IndexedTarSamples(path=str(self.shards[shard]))
        self._open.move_to_end(shard)
        tar = self._open[shard]
        members, key = {}, ""
        for j in tar.samples[int(self.offset_in_shard[index])]:
            key, ext = splitname(tar.reader.by_index[j][0])
            members[ext[1:]] = j
        return tar, key, members

    def shard_sizes(self) -> list[int]:
        """Samples per shard, in shard order (the samples of shard k follow those of k-1)."""
        return np.bincount(self.shard_of, minlength=len(self.shards)).tolist()

    def __getstate__(self) -> dict[str, Any]:  # worker processes open their own shards
        return {**self.__dict__, "_open": OrderedDict()}


def _info_lengths(info: dict[str, Any], split: str | None) -> dict[str, int]:
    lengths: dict[str, int] = {}
    for name, entry in (info.get("splits") or {}).items():
        if split is None or name == split:
            lengths.update(zip(entry.get("filenames", []), entry.get("shard_lengths", [])))
    return lengths


def split_shards(folder: Path) -> dict[str, list[Path]]:
    """{'train': [...], 'val': [...]} of a folder holding both splits' shards, by _info.json's
    `splits` or by name prefix (`train-*.tar`, `val-*.tar` or `validation-*.tar`); {} when the
    folder holds one split."""
    info = read_info(folder)
    splits = info.get("splits") or {}
    out = {}
    for name, aliases in (("train", ("train",)), ("val", ("val", "validation"))):
        for alias in aliases:
            if alias in splits and splits[alias].get("filenames"):
                out[name] = [folder / f for f in splits[alias]["filenames"]]
                missing = [str(p) for p in out[name] if not p.is_file()]
                if missing:
                    raise DataError(f"{len(missing)} shard(s) that {folder / INFO_NAMES[0]} "
                                    f"lists for '{alias}' do not exist, e.g. {missing[0]!r}")
                break
            found = sorted(folder.glob(f"{alias}[-_.]*.tar"))
            if found:
                out[name] = found
                break
    return out if "train" in out else {}


# --- writing shards (`moat shard`) -----------------------------------------------------------

SHARD_NAME = "{split}-{index:06d}.tar"


def write_shards(splits: dict[str, ImageDataset], out: str | os.PathLike, shard_size: int,
                 workers: int = 1, seed: int = 0) -> dict[str, Any]:
    """Write each split's samples (shuffled with `seed`, so a shard mixes classes) into
    WebDataset shards of `shard_size` samples: `OUT/{split}-000000.tar`, ..., each member
    `KEY.<image suffix>` (the file's own bytes), `KEY.cls` (class index) and `KEY.json`
    (class name, source path), in `workers` processes; each shard is written under a temporary
    name and renamed when complete. Then `_info.json` (timm's layout plus `class_names`) is
    written, atomically, last. Returns its content."""
    if shard_size < 1:
        raise DataError(f"--shard-size must be >= 1, got {shard_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = next(iter(splits.values())).classes
    jobs = []
    for split, dataset in splits.items():
        order = np.random.default_rng(seed).permutation(len(dataset))
        for k, start in enumerate(range(0, len(dataset), shard_size)):
            rows = [(dataset.path(i), int(dataset.targets_array[i]))
                    for i in order[start:start + shard_size]]
            jobs.append((split, str(out / SHARD_NAME.format(split=split, index=k)), rows,
                         classes, start))
    with ProcessPoolExecutor(max(1, workers)) if workers > 1 else _Inline() as pool:
        lengths = list(pool.map(_write_shard, jobs))
    info: dict[str, Any] = {"name": out.name, "num_classes": len(classes),
                            "class_names": list(classes), "splits": {}}
    for split in splits:
        mine = [(Path(job[1]).name, n) for job, n in zip(jobs, lengths) if job[0] == split]
        info["splits"][split] = {"name": split, "num_samples": sum(n for _, n in mine),
                                 "filenames": [f for f, _ in mine],
                                 "shard_lengths": [n for _, n in mine]}
    atomic_write_text(out / INFO_NAMES[0], json.dumps(info, indent=1) + "\n")
    return info


def _write_shard(job: tuple[str, str, list[tuple[str, int]], list[str], int]) -> int:
    split, target, rows, classes, first = job
    tmp = Path(target).with_name(f".tmp-{Path(target).name}")
    with open(tmp, "wb") as stream:
        writer = TarWriter(stream)
        for n, (path, label) in enumerate(rows):
            suffix = Path(path).suffix.lower().lstrip(".")
            data = Path(path).read_bytes()
            if suffix not in IMAGE_KEYS:  # bmp, gif, tiff...: stored as PNG, decoded once here
                buffer = io.BytesIO()
                load_rgb(path).save(buffer, format="PNG")
                suffix, data = "png", buffer.getvalue()
            writer.write({"__key__": f"{split}{first + n:08d}", suffix: data,
                          "cls": str(label).encode(),
                          "json": json.dumps({"label": label, "class": classes[label],
                                              "source": str(path)}).encode()})
        writer.close()
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, target)
    return len(rows)


class _Inline:
    """The executor interface, run in this process (workers=1)."""

    def __enter__(self) -> _Inline:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def map(self, func, items):  # noqa: ANN001
        return map(func, items)
