"""The metadata header of every weights file moat writes: one dataclass, encoded here only.

A safetensors header holds string -> string. ``WeightsMetadata.to_header`` writes strings as
they are and every other value as JSON; ``WeightsMetadata.read``/``from_header`` decode them
by field. Converted official weights (``moat convert``, the download cache,
``save_pretrained``) and training checkpoints (``format="moat-train"``, which add the
training config and the task's metadata) share the fields that rebuild the model.
Keys this version does not know are kept in ``extra`` (files written by a newer moat).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from moat._version import __version__
from moat.integrity import DamagedFileError
from moat.weights.catalogue import NO_PE_SUFFIX, PretrainedWeights

CONVERTER_VERSION = "1"
# Written as they are; every other field is JSON.
_STRINGS = {"format", "variant", "pretrained_tag", "input_range", "interpolation", "source_file",
            "source_sha256", "source_weights", "bn_statistics", "task", "weights",
            "converter_version", "moat_version", "torch_version", "python_version"}

__all__ = ["CONVERTER_VERSION", "WeightsMetadata"]


@dataclass
class WeightsMetadata:
    """What a weights file says about itself: enough to build, feed, label and trace it."""

    format: str | None = None  # "moat" (weights) or "moat-train" (a training checkpoint)
    variant: str | None = None  # moat.list_models() name
    position_embedding: bool = True
    num_classes: int | None = None
    pretrained_tag: str | None = None  # the release the weights come from, if any
    native_resolution: int | None = None
    input_range: str | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    interpolation: str | None = None
    crop_pct: float | None = None
    label_names: Sequence[str] | None = None  # class i's name, for every i
    model_args: Mapping[str, Any] | None = None  # moat.create_model keywords beyond the variant
    source_file: str | None = None  # provenance of converted weights
    source_sha256: str | None = None
    source_weights: str | None = None  # "raw" or "ema" copies of the TF checkpoint
    bn_statistics: str | None = None
    task: str | None = None  # training checkpoints
    config: Mapping[str, Any] | None = None
    task_metadata: Mapping[str, Any] | None = None
    weights: str | None = None  # "ema" for a checkpoint's EMA copy
    converter_version: str | None = None
    moat_version: str | None = None
    torch_version: str | None = None
    python_version: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def for_release(cls, release: PretrainedWeights, **fields: Any) -> WeightsMetadata:
        """The header of a release's weights: its variant, preprocessing and class names."""
        config = release.data_config()
        values = dict(format="moat", variant=release.model,
                      position_embedding=release.position_embedding,
                      num_classes=release.num_classes, pretrained_tag=release.tag,
                      native_resolution=release.resolution, input_range="0..1 RGB",
                      mean=config["mean"], std=config["std"],
                      interpolation=config["interpolation"], crop_pct=config["crop_pct"],
                      converter_version=CONVERTER_VERSION)
        values.update(fields)
        if values["num_classes"] == release.num_classes:  # names fit the release's classifier
            values.setdefault("label_names", list(release.label_names))
        return cls(**values)

    @property
    def model_name(self) -> str | None:
        """The name moat.create_model builds: 'moat_0' or 'moat_0_no_pe'."""
        if self.variant is None:
            return None
        return self.variant + ("" if self.position_embedding else NO_PE_SUFFIX)

    def data_config(self) -> dict[str, Any]:
        """timm-style preprocessing recorded in the file (keys it lacks are left out)."""
        out: dict[str, Any] = {}
        if self.native_resolution:
            out["input_size"] = (3, self.native_resolution, self.native_resolution)
        for key in ("interpolation", "crop_pct", "mean", "std"):
            if getattr(self, key) is not None:
                out[key] = tuple(getattr(self, key)) if key in ("mean", "std") \
                    else getattr(self, key)
        return out

    # --- the encoding: the only place that writes or reads a header ---------------------------

    def to_header(self) -> dict[str, str]:
        """String -> string for safetensors; versions of this process filled in if unset."""
        values = dataclasses.asdict(self)
        extra = values.pop("extra")
        values.update(moat_version=self.moat_version or __version__,
                      torch_version=self.torch_version or torch.__version__,
                      python_version=self.python_version or platform.python_version())
        header = dict(extra)
        for key, value in values.items():
            if value is not None:
                header[key] = value if key in _STRINGS else json.dumps(value)
        return header

    @classmethod
    def from_header(cls, header: Mapping[str, str]) -> WeightsMetadata:
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values: dict[str, Any] = {}
        extra = {}
        for key, text in header.items():
            if key not in known:
                extra[key] = text
            elif key in _STRINGS:
                values[key] = text
            elif text != "None":  # older training checkpoints wrote str(None)
                values[key] = json.loads(text)
        return cls(**values, extra=extra)

    @classmethod
    def read(cls, path: str | os.PathLike) -> WeightsMetadata:
        """The header of a .safetensors file (empty for files moat did not write)."""
        try:
            with safe_open(os.fspath(path), framework="pt") as f:
                return cls.from_header(f.metadata() or {})
        except SafetensorError as err:
            raise DamagedFileError(path, f"not a readable safetensors file ({err})") from None
