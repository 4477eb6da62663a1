"""The 18 released MOAT checkpoints as pretrained tags: pure data, no I/O beyond package files.

Tag scheme: ``<model>[_no_pe].<data>_<resolution>``

* ``<model>`` is a name from ``moat.list_models()``; ``_no_pe`` marks the checkpoints
  trained without relative position embedding (the "wo_position_embedding" files), which
  need ``position_embedding=False``. ``moat.create_model`` accepts ``moat_0_no_pe`` too.
* ``<data>``: ``in1k`` (trained on ImageNet-1k) or ``in22k_ft_in1k`` (pre-trained on
  ImageNet-22k, fine-tuned on ImageNet-1k); ``<resolution>`` is the training resolution.

Examples: ``moat_0.in1k_224``, ``moat_0_no_pe.in1k_224``, ``moat_2.in22k_ft_in1k_384``,
``tiny_moat_0.in1k_256``.

Every entry carries its preprocessing and its class names, so neither is ever guessed. The
facts come from ``moat.data.preprocessing`` (one source for the whole package): normalisation is
the official one per checkpoint (deeplab2 docs): "option 1" is ImageNet mean/std on 0..255
input, i.e. mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) on 0..1; "option 2" is
(x - 127.5) / 127.5, i.e. mean 0.5 and std 0.5 on 0..1. The resolution is the variant's
native one (``MoatConfig.native_resolution``). The official evaluation resize/crop is not
published; ``moat.data.preprocessing`` documents the choice (bicubic, crop_pct 0.875).

Params, FLOPs (multiply-adds) and top-1 are the documented numbers of the release.
``sha256`` and ``size`` are None where the released file's hash and byte count are unknown
(no download was possible when this table was written); fill them in to have every download
verified against them (every tensor's crc32c is verified regardless).

The ImageNet-1k class names (``imagenet1k_classes.txt``, in the standard class-index order
the releases use) were generated from torchvision's weights metadata
(``ResNet50_Weights.IMAGENET1K_V1.meta["categories"]``), not typed.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any

from moat.data.preprocessing import NORMALISATION, imagenet_data_config
from moat.errors import InvalidInputError
from moat.models.config import MODEL_CONFIGS

BASE_URL = "https://storage.googleapis.com/gresearch/tf-deeplab/checkpoint/"
NO_PE_SUFFIX = "_no_pe"
DATASETS = {"in1k": "ImageNet-1k", "in22k_ft_in1k": "ImageNet-22k -> ImageNet-1k"}

__all__ = ["BASE_URL", "DATASETS", "NO_PE_SUFFIX", "PRETRAINED", "PretrainedWeights", "find",
           "imagenet_classes", "list_pretrained", "release", "split_name"]


@cache
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, index i = logit i of every release."""
    text = files("moat.weights").joinpath("imagenet1k_classes.txt").read_text(encoding="utf-8")
    names = tuple(text.splitlines())
    if len(names) != 1000:  # a damaged installation, not a user error
        raise RuntimeError(f"imagenet1k_classes.txt holds {len(names)} names, not 1000")
    return names


@dataclass(frozen=True)
class PretrainedWeights:
    """One released checkpoint: where it is, what it needs, how good it is."""

    model: str  # moat.list_models() name
    position_embedding: bool
    data: str  # key of DATASETS
    params_m: float  # documented parameters, millions
    gflops: float  # documented multiply-adds, billions, at `resolution`
    top1: float  # documented ImageNet-1k top-1, percent
    sha256: str | None = None  # of the released archive, where known
    size: int | None = None  # bytes of the released archive, where known
    num_classes: int = 1000

    @property
    def tag(self) -> str:
        suffix = "" if self.position_embedding else NO_PE_SUFFIX
        return f"{self.model}{suffix}.{self.data}_{self.resolution}"

    @property
    def file(self) -> str:
        """File name in the current official docs (renamed from `_with_` on 2022-11-05)."""
        number = self.model.rsplit("_", 1)[1]
        family = "tiny_moat" if self.model.startswith("tiny") else "moat"
        data = {"in1k": "imagenet_1k", "in22k_ft_in1k": "imagenet_22k_and_1k"}[self.data]
        pe = "w" if self.position_embedding else "wo"
        return f"{family}{number}_{data}_{self.resolution}_{pe}_position_embedding.tar.gz"

    @property
    def url(self) -> str:
        return BASE_URL + self.file

    @property
    def resolution(self) -> int:
        return MODEL_CONFIGS[self.model].native_resolution

    @property
    def normalization(self) -> str:
        """Official option: "option2" (127.5/127.5) for the ImageNet-22k checkpoints
        (MOAT-2/3/4), "option1" (ImageNet mean/std) for all others."""
        return "option2" if self.data.startswith("in22k") else "option1"

    @property
    def label_names(self) -> tuple[str, ...]:
        return imagenet_classes()  # every release classifies ImageNet-1k

    def data_config(self) -> dict[str, Any]:
        """timm-style: input_size (C, H, W); mean/std apply to 0..1 RGB input."""
        return {**imagenet_data_config(self.resolution), **NORMALISATION[self.normalization]}

    def pretrained_cfg(self, with_labels: bool = True) -> dict[str, Any]:
        """timm-style pretrained_cfg: the tag, preprocessing, classes and their names."""
        cfg = dict(tag=self.tag, num_classes=self.num_classes, **self.data_config())
        if with_labels:
            cfg["label_names"] = list(self.label_names)
        return cfg


def _entries() -> list[PretrainedWeights]:
    # (model, data, with PE: (params M, GFLOPs, top-1), without PE: (...)), as documented
    table = [
        ("moat_0", "in1k", (27.8, 5.7, 83.3), (27.8, 5.7, 83.0)),
        ("moat_1", "in1k", (41.6, 9.1, 84.2), (41.5, 9.1, 84.1)),
        ("moat_2", "in22k_ft_in1k", (73.4, 54.3, 87.5), (73.2, 53.8, 87.2)),
        ("moat_3", "in22k_ft_in1k", (190.0, 271.0, 88.4), (189.5, 266.1, 88.2)),
        ("moat_4", "in22k_ft_in1k", (483.2, 648.5, 89.1), (482.5, 640.6, 88.9)),
        ("tiny_moat_0", "in1k", (3.4, 1.1, 76.6), (3.3, 1.1, 76.0)),
        ("tiny_moat_1", "in1k", (5.1, 1.6, 79.2), (5.1, 1.6, 78.9)),
        ("tiny_moat_2", "in1k", (9.8, 3.0, 81.7), (9.7, 3.0, 81.3)),
        ("tiny_moat_3", "in1k", (19.5, 6.0, 83.3), (19.5, 6.0, 83.0)),
    ]
    return [PretrainedWeights(model, pe, data, *(with_pe if pe else without_pe))
            for pe in (True, False) for model, data, with_pe, without_pe in table]


PRETRAINED: dict[str, PretrainedWeights] = {w.tag: w for w in _entries()}


def list_pretrained(pattern: str = "*") -> list[str]:
    """Pretrained tags matching a shell-style pattern, e.g. 'tiny_*' or '*in22k*'."""
    return [tag for tag in PRETRAINED if fnmatch.fnmatch(tag, pattern)]


def split_name(name: str) -> tuple[str, bool, str | None]:
    """'moat_0_no_pe.in1k_224' -> ('moat_0', False, 'moat_0_no_pe.in1k_224')."""
    arch, dot, _ = name.partition(".")
    if dot and name not in PRETRAINED:
        near = list_pretrained(arch + ".*") or list(PRETRAINED)
        raise InvalidInputError(f"unknown pretrained tag {name!r}; available: {', '.join(near)}")
    pe = not arch.endswith(NO_PE_SUFFIX)
    return (arch if pe else arch[:-len(NO_PE_SUFFIX)]), pe, (name if dot else None)


def find(model: str, position_embedding: bool = True) -> PretrainedWeights:
    """The release of a variant (there is one per variant and PE setting)."""
    for weights in PRETRAINED.values():
        if weights.model == model and weights.position_embedding == position_embedding:
            return weights
    raise InvalidInputError(f"no released checkpoint for {model!r} (position_embedding="
                            f"{position_embedding}); known models: "
                            f"{sorted({w.model for w in PRETRAINED.values()})}")


def release(name: str) -> PretrainedWeights:
    """The release a name refers to: a tag, or a variant name ('moat_0', 'moat_0_no_pe')."""
    model, pe, tag = split_name(name)
    return PRETRAINED[tag] if tag else find(model, pe)
