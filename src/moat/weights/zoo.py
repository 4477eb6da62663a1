"""The 18 released MOAT checkpoints as pretrained tags, with the preprocessing they expect.

Tag scheme: ``<model>[_no_pe].<data>_<resolution>``

* ``<model>`` is a name from ``moat.list_models()``; ``_no_pe`` marks the checkpoints
  trained without relative position embedding (the "wo_position_embedding" files), which
  need ``position_embedding=False``. ``moat.create_model`` accepts ``moat_0_no_pe`` too.
* ``<data>``: ``in1k`` (trained on ImageNet-1k) or ``in22k_ft_in1k`` (pre-trained on
  ImageNet-22k, fine-tuned on ImageNet-1k); ``<resolution>`` is the training resolution.

Examples: ``moat_0.in1k_224``, ``moat_0_no_pe.in1k_224``, ``moat_2.in22k_ft_in1k_384``,
``tiny_moat_0.in1k_256``.

Every entry carries its preprocessing, so it is never guessed. The facts come from
``moat.preprocessing`` (one source for the whole package): normalisation is the official
one per checkpoint (deeplab2 docs): "option 1" is ImageNet mean/std on 0..255 input, i.e.
mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225) on 0..1; "option 2" is
(x - 127.5) / 127.5, i.e. mean 0.5 and std 0.5 on 0..1. The resolution is the variant's
native one (``MoatConfig.native_resolution``). The official evaluation resize/crop is not
published; ``moat.preprocessing`` documents the choice (bicubic, crop_pct 0.875).
Override with ``create_transform(crop_pct=...)``.

Params, FLOPs (multiply-adds) and top-1 are the documented numbers of the release.
``sha256`` is None where the hash of the released file is unknown (no download was
possible when this table was written); fill it in to have every load verified.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moat.models.config import MODEL_CONFIGS
from moat.preprocessing import CROP_PCT, INTERPOLATION, NORMALISATION, VARIANT_NORMALISATION

BASE_URL = "https://storage.googleapis.com/gresearch/tf-deeplab/checkpoint/"
NO_PE_SUFFIX = "_no_pe"
if TYPE_CHECKING:
    from torchvision.transforms import v2

    from moat.models import MoatNet

DATASETS = {"in1k": "ImageNet-1k", "in22k_ft_in1k": "ImageNet-22k -> ImageNet-1k"}


@dataclass(frozen=True)
class PretrainedWeights:
    """One released checkpoint: where it is, what it needs, how good it is."""

    model: str  # moat.list_models() name
    position_embedding: bool
    data: str  # key of DATASETS
    params_m: float  # documented parameters, millions
    gflops: float  # documented multiply-adds, billions, at `resolution`
    top1: float  # documented ImageNet-1k top-1, percent
    sha256: str | None = None
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
        """Official option: "option1" (ImageNet mean/std) or "option2" (127.5/127.5)."""
        return VARIANT_NORMALISATION[self.model]

    def data_config(self) -> dict[str, Any]:
        """timm-style: input_size (C, H, W); mean/std apply to 0..1 RGB input."""
        return dict(input_size=(3, self.resolution, self.resolution),
                    interpolation=INTERPOLATION, crop_pct=CROP_PCT,
                    **NORMALISATION[self.normalization])


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
        raise ValueError(f"unknown pretrained tag {name!r}; available: {', '.join(near)}")
    pe = not arch.endswith(NO_PE_SUFFIX)
    return (arch if pe else arch[:-len(NO_PE_SUFFIX)]), pe, (name if dot else None)


def find(model: str, position_embedding: bool = True) -> PretrainedWeights:
    """The release of a variant (there is one per variant and PE setting)."""
    for weights in PRETRAINED.values():
        if weights.model == model and weights.position_embedding == position_embedding:
            return weights
    raise ValueError(f"no released checkpoint for {model!r} (position_embedding="
                     f"{position_embedding}); known models: "
                     f"{sorted({w.model for w in PRETRAINED.values()})}")


def get(name_or_model: Any) -> PretrainedWeights:
    """Zoo entry of a tag, a model name ('moat_0', 'moat_0_no_pe') or a model instance.

    A model built from a tag remembers it (``model.pretrained_tag``); any other model maps
    to the release of its variant and position-embedding setting.
    """
    if isinstance(name_or_model, str):
        model, pe, tag = split_name(name_or_model)
        return PRETRAINED[tag] if tag else find(model, pe)
    tag = getattr(name_or_model, "pretrained_tag", None)
    if tag:
        return PRETRAINED[tag]
    from moat.weights.convert import model_variant

    variant = model_variant(name_or_model)
    if variant.name == "?":
        raise ValueError("cannot tell which MOAT variant this model is; pass a pretrained tag")
    return find(variant.name, variant.position_embedding)


def data_config(model_or_tag: Any) -> dict[str, Any]:
    """Input size, interpolation, crop_pct, mean and std (0..1 scale) the weights expect."""
    return get(model_or_tag).data_config()


def create_transform(model_or_tag: Any, *, img_size: int | Sequence[int] | None = None,
                     crop_pct: float | None = None, interpolation: str | None = None,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                     ) -> v2.Compose:
    """The evaluation transform (torchvision.transforms.v2) of a checkpoint.

    PIL image or uint8 tensor in, normalised float32 CxHxW tensor out. Any argument given
    overrides the checkpoint's value, e.g. ``img_size=448`` to evaluate at another size.
    """
    from moat.data.transforms import eval_transform  # needs torchvision (the `full` extra)

    config = data_config(model_or_tag)
    size = img_size or config["input_size"][1:]
    if isinstance(size, Sequence) and size[0] == size[-1]:
        size = int(size[0])
    return eval_transform(size,
                          mean=mean or config["mean"], std=std or config["std"],
                          interpolation=interpolation or config["interpolation"],
                          crop_pct=crop_pct or config["crop_pct"])


def transforms(tag: str) -> v2.Compose:
    """The exact evaluation transform of a pretrained tag (see `create_transform`)."""
    return create_transform(tag)


def create_model(name: str, *, weights: str | os.PathLike | None = None,
                 sha256: str | None = None, ema: bool = False,
                 allow_missing_bn_stats: bool = False, **kwargs: Any) -> MoatNet:
    """Build a model by name or pretrained tag and optionally load weights from a file.

    ``name``: a variant (``"moat_0"``), its no-PE form (``"moat_0_no_pe"``) or a pretrained
    tag (``"moat_0.in1k_224"``). ``weights``: the released ``.tar.gz``, an extracted
    checkpoint (prefix, ``.index`` or directory), or a converted ``.safetensors`` file;
    the variant in the file must match ``name``. ``sha256`` (or the zoo's, when known) is
    checked before anything is read. With a pretrained tag and ``num_classes`` other than
    the release's 1000, the backbone is loaded and a fresh classifier is created (for
    fine-tuning). Other keyword arguments go to ``moat.models.create_model``.

    Weights are never downloaded: fetch ``moat.weights.zoo.get(tag).url`` yourself.
    """
    from moat.models import create_model as build
    from moat.weights.io import load_weights

    model_name, pe, tag = split_name(name)
    if not pe:
        if kwargs.get("position_embedding", False):
            raise ValueError(f"{name!r} is a model without position embedding; "
                             "drop position_embedding=True")
        kwargs["position_embedding"] = False
    if weights is None:
        model = build(model_name, **kwargs)
    else:
        entry = PRETRAINED[tag] if tag else None
        num_classes = kwargs.pop("num_classes", entry.num_classes if entry else 1000)
        new_head = entry is not None and num_classes != entry.num_classes
        model = build(model_name, num_classes=0 if new_head else num_classes, **kwargs)
        load_weights(model, weights, sha256=sha256 or (entry.sha256 if entry else None),
                     ema=ema, allow_missing_bn_stats=allow_missing_bn_stats)
        if new_head and not kwargs.get("features_only"):
            model.reset_classifier(num_classes)
    if tag:
        model.pretrained_tag = tag
    return model
