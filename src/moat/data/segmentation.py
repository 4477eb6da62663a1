"""Semantic segmentation data: the ADE20K layout, a generic image/mask folder pair, the
dataset of (image, mask) pairs, and joint image+mask augmentation.

Layouts (`find_segmentation_splits` detects them):

* **ADE20K** (ADEChallengeData2016): `images/{training,validation}/*.jpg` and
  `annotations/{training,validation}/*.png`. Masks hold 0 = "other" and 1..150 = classes;
  with `reduce_zero_label` (the ADE20K convention) 0 becomes the ignore index and k becomes
  k-1, giving 150 classes 0..149 (`ADE20K_CLASSES`).
* **folder**: `images/` and `masks/` whose files are matched by stem (`a.jpg` <-> `a.png`),
  either directly under the root (one split) or under `train/` and `val/`.

Masks become class ids as `moat.data.masks` describes (grey or palette values, colour
tables, binary masks, `ignore_index`).

Images go through the robust loader (`moat.data.images.load_rgb`). An unreadable image or
mask, or a mask whose size differs from its image, yields a `BadSample` that the collate
drops and reports (as for classification), or raises with `strict=True`.

Augmentation uses torchvision.transforms.v2 with `tv_tensors.Mask`, which applies every
geometric op to image and mask alike (nearest-neighbour for the mask) and photometric ops to
the image only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from moat.data.bad_images import BadSample, split_bad
from moat.data.images import IMAGE_SUFFIXES, BadImageError, load_rgb
from moat.data.masks import (IGNORE_INDEX, MASK_EXTENSIONS, Colour, binarize, colours_to_ids,
                             read_mask_pixels, reduce_zero_label)
from moat.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD, size_pair
from moat.errors import InvalidInputError

ADE20K_CLASSES = 150  # SceneParsing-150; the masks' 0 ("other") is not a class

SegTransform = Callable[[tv_tensors.Image, tv_tensors.Mask], tuple[torch.Tensor, torch.Tensor]]


class SegBatch(NamedTuple):
    """A collated batch. `images` [B,3,H,W] and `masks` [B,H,W] int64 (lists of tensors when
    the sizes differ, as in whole-image evaluation), `bad` the files that were skipped."""

    images: torch.Tensor | list[torch.Tensor]
    masks: torch.Tensor | list[torch.Tensor]
    bad: list[BadSample]


# --- layouts ------------------------------------------------------------------------------

def _files(folder: Path, extensions: Sequence[str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_file() and not entry.name.startswith(".") \
                and entry.name.lower().endswith(tuple(extensions)):
            stem = os.path.splitext(entry.name)[0]
            if stem in found:
                raise InvalidInputError(f"two files with stem {stem!r} in {str(folder)!r}: "
                                        f"{found[stem].name} and {entry.name}")
            found[stem] = Path(entry.path)
    return found


def find_pairs(image_dir: str | os.PathLike, mask_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """(image, mask) paths matched by file stem, sorted by stem.

    Every image needs a mask (the error lists those without); masks without an image are
    ignored.
    """
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"no such folder: {str(d)!r}")
    images, masks = _files(image_dir, IMAGE_SUFFIXES), _files(mask_dir, MASK_EXTENSIONS)
    if not images:
        raise InvalidInputError(f"no images in {str(image_dir)!r}")
    orphans = sorted(set(images) - set(masks))
    if orphans:
        shown = ", ".join(images[s].name for s in orphans[:5])
        raise InvalidInputError(f"{len(orphans)} image(s) in {str(image_dir)!r} have no mask of "
                                f"the same name in {str(mask_dir)!r}: "
                                f"{shown}{' ...' if len(orphans) > 5 else ''}")
    return [(str(images[s]), str(masks[s])) for s in sorted(images)]


class SplitDirs(NamedTuple):
    images: Path
    masks: Path


class SegmentationLayout(NamedTuple):
    """Where a dataset's splits live; `val` is None for a single-split folder."""

    name: str  # "ade20k" or "folder"
    train: SplitDirs
    val: SplitDirs | None
    reduce_zero_label: bool  # the layout's convention (ADE20K: True)


def find_segmentation_splits(root: str | os.PathLike, layout: str = "auto") -> SegmentationLayout:
    """Detect (or check) the layout of `root`: "ade20k", "folder" or "auto"."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no such dataset folder: {str(root)!r}")
    if layout not in ("auto", "ade20k", "folder"):
        raise InvalidInputError(f"unknown segmentation layout {layout!r}; use auto, ade20k or "
                                f"folder")
    ade = root / "images" / "training", root / "annotations" / "training"
    if layout == "ade20k" or (layout == "auto" and ade[0].is_dir()):
        if not (ade[0].is_dir() and ade[1].is_dir()):
            raise FileNotFoundError(f"{str(root)!r} is not in the ADE20K layout: expected "
                                    "images/training and annotations/training")
        val = SplitDirs(root / "images" / "validation", root / "annotations" / "validation")
        return SegmentationLayout("ade20k", SplitDirs(*ade),
                                  val if val.images.is_dir() and val.masks.is_dir() else None,
                                  True)
    for train_name, val_name in (("train", "val"), ("training", "validation")):
        train = SplitDirs(root / train_name / "images", root / train_name / "masks")
        if train.images.is_dir() and train.masks.is_dir():
            val = SplitDirs(root / val_name / "images", root / val_name / "masks")
            return SegmentationLayout("folder", train,
                                      val if val.images.is_dir() and val.masks.is_dir() else None,
                                      False)
    single = SplitDirs(root / "images", root / "masks")
    if single.images.is_dir() and single.masks.is_dir():
        return SegmentationLayout("folder", single, None, False)
    raise FileNotFoundError(
        f"no segmentation dataset found in {str(root)!r}: expected the ADE20K layout "
        "(images/training, annotations/training, ...) or image/mask folders "
        "(images/ + masks/, or train/{images,masks} + val/{images,masks})")


# --- dataset ------------------------------------------------------------------------------

class SegmentationDataset(Dataset):
    """(image, mask) pairs: `transform(Image, Mask)` -> (image tensor, int64 mask tensor).

    Without a transform, items are (uint8 [3,H,W] tv_tensors.Image, int64 [H,W] Mask).
    Returns a BadSample for an unreadable file or mismatched sizes (raises when `strict`).
    """

    def __init__(self, pairs: Sequence[tuple[str, str]], transform: SegTransform | None = None,
                 *, reduce_zero_label: bool = False, ignore_index: int = IGNORE_INDEX,
                 strict: bool = False, classes: Sequence[str] | None = None,
                 colours: Sequence[Colour] | None = None, binary: bool = False) -> None:
        if not pairs:
            raise InvalidInputError("segmentation dataset has no samples")
        self.pairs = [(str(i), str(m)) for i, m in pairs]
        self.transform = transform
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index
        self.strict = strict
        self.classes = None if classes is None else list(classes)
        self.colours = None if colours is None else [tuple(c) for c in colours]
        self.binary = binary

    @classmethod
    def from_folders(cls, image_dir, mask_dir, transform: SegTransform | None = None,
                     **kwargs: Any) -> SegmentationDataset:
        return cls(find_pairs(image_dir, mask_dir), transform, **kwargs)

    def __len__(self) -> int:
        return len(self.pairs)

    def path(self, index: int) -> str:
        return self.pairs[index][0]

    def mask_ids(self, pixels: np.ndarray, path: str) -> np.ndarray:
        """A mask file's pixels (`read_mask_pixels`) as the class ids trained on."""
        if pixels.ndim == 3:
            if not self.colours:
                raise BadImageError(
                    f"mask {path!r} is a colour (RGB) image: give the colour of each class in "
                    "classes.json (see `moat data check`) or save the masks as grey or "
                    "palette PNGs of class ids", path)
            mask = colours_to_ids(pixels, self.colours, self.ignore_index)
        else:
            mask = pixels
        if self.binary:
            mask = binarize(mask)
        if self.reduce_zero_label:
            mask = reduce_zero_label(mask, self.ignore_index)
        return mask

    def load(self, index: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        """The untransformed pair; raises BadImageError for unusable files."""
        image_path, mask_path = self.pairs[index]
        image = load_rgb(image_path)
        mask = self.mask_ids(read_mask_pixels(mask_path), mask_path)
        if mask.shape != (image.height, image.width):
            raise BadImageError(
                f"mask {mask_path!r} is {mask.shape[1]}x{mask.shape[0]} but image "
                f"{image_path!r} is {image.width}x{image.height}; they must have the same size",
                image_path)
        return tv_tensors.Image(TF.pil_to_tensor(image)), tv_tensors.Mask(torch.from_numpy(mask))

    def __getitem__(self, index: int):
        try:
            image, mask = self.load(index)
        except BadImageError as err:
            if self.strict:
                raise BadImageError(f"{err} (strict mode: turn strict off to skip bad files)",
                                    err.path) from err
            return BadSample(self.pairs[index][0], str(err))
        if self.transform is not None:
            return self.transform(image, mask)
        return image, mask


# --- transforms ---------------------------------------------------------------------------


class JointTransform:
    """Runs a v2 pipeline on (Image, Mask) and returns plain tensors (float image, int64
    mask). A class so that it pickles to DataLoader workers."""

    def __init__(self, ops: Sequence[Any], mask_ops: bool = True) -> None:
        self.pipeline = v2.Compose(list(ops))
        self.mask_ops = mask_ops

    def __call__(self, image: tv_tensors.Image, mask: tv_tensors.Mask):
        if self.mask_ops:
            image, mask = self.pipeline(image, mask)
        else:  # eval: the mask keeps its original resolution
            image = self.pipeline(image)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor).long()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pipeline})"


def train_transform(
    crop_size: int | Sequence[int],
    *,
    scale: tuple[float, float] = (0.5, 2.0),
    base_size: int | None = None,
    hflip: float = 0.5,
    photometric: bool = True,
    ignore_index: int = IGNORE_INDEX,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> JointTransform:
    """Random scale, random crop, flip and colour jitter, applied consistently.

    The shorter side is resized to `base_size * s`, s uniform in `scale` (base_size defaults
    to the crop's shorter side); then a `crop_size` crop is taken, padding with black and with
    `ignore_index` in the mask where the image is smaller than the crop.
    """
    crop = size_pair(crop_size)
    base = base_size or min(crop)
    lo, hi = max(1, round(base * scale[0])), max(2, round(base * scale[1]))
    ops: list[Any] = []
    if (lo, hi) != (base, base + 1):
        ops.append(v2.RandomResize(lo, max(hi, lo + 1), antialias=True))
    ops.append(v2.RandomCrop(crop, pad_if_needed=True,
                             fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}))
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    if photometric:
        ops.append(v2.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.04))
    ops += [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
            v2.Normalize(mean, std)]
    return JointTransform(ops)


def eval_transform(
    size: int | None = None,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> JointTransform:
    """Normalise the image; with `size`, resize its shorter side to `size` first. The mask is
    left at its original size: metrics are computed at the annotation's resolution (the
    segmenter upsamples its logits to the mask)."""
    ops: list[Any] = [] if size is None else [v2.Resize(size, antialias=True)]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return JointTransform(ops, mask_ops=False)


# --- collate ------------------------------------------------------------------------------

class SegmentationCollate:
    """Drops BadSamples (returned in `bad`); stacks same-size samples, else returns lists."""

    def __call__(self, samples: list) -> SegBatch:
        good, bad = split_bad(samples)
        if not good:
            return SegBatch(torch.empty(0, 3, 1, 1), torch.empty(0, 1, 1, dtype=torch.long), bad)
        images, masks = [s[0] for s in good], [s[1] for s in good]
        if len({tuple(i.shape) for i in images}) == 1 and len({tuple(m.shape) for m in masks}) == 1:
            return SegBatch(torch.stack(images), torch.stack(masks), bad)
        return SegBatch(images, masks, bad)


def segmentation_datasets(
    root: str | os.PathLike,
    train_transform: SegTransform | None,
    val_transform: SegTransform | None,
    *,
    layout: str = "auto",
    reduce_zero_label: bool | None = None,
    ignore_index: int = IGNORE_INDEX,
    strict: bool = False,
    colours: Sequence[Colour] | None = None,
    binary: bool = False,
) -> tuple[SegmentationDataset, SegmentationDataset | None]:
    """(train, val) from a dataset root; val is None when the layout has no validation split.

    `reduce_zero_label` None takes the layout's convention (ADE20K: True, folder: False).
    """
    found = find_segmentation_splits(root, layout)
    reduce = found.reduce_zero_label if reduce_zero_label is None else reduce_zero_label
    common = dict(reduce_zero_label=reduce, ignore_index=ignore_index, strict=strict,
                  colours=colours, binary=binary)
    train = SegmentationDataset.from_folders(*found.train, train_transform, **common)
    val = None if found.val is None else \
        SegmentationDataset.from_folders(*found.val, val_transform, **common)
    return train, val
