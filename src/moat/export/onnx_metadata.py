"""The metadata moat records in an ONNX file (its ``metadata_props``): the one module that
writes and reads these keys, as ``moat.weights.metadata`` owns the weights header.

* ``moat.preprocessing`` (every ``moat export onnx`` file): ``input_size`` (3, H, W), like
  every ``input_size`` in moat, ``crop_pct``, ``interpolation``, ``mean`` and ``std``: what an
  image needs to become the graph's input (``moat quantize`` calibrates with it, the app
  and ``moat eval`` preprocess with it);
* ``moat.config`` and ``moat.task_metadata`` (a file exported from a training run): the
  run's ``TrainConfig`` and its task's metadata (class names), so ``moat eval FILE.onnx``
  rebuilds the task;
* ``moat.gelu`` (every ``moat export onnx`` file): the GELU form, "exact" or "tanh";
  ``moat.gelu_cost``: what the tanh form was measured to change (``moat.export.gelu``);
* ``moat.quantization``: how ``moat quantize`` made the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from moat.data.preprocessing import imagenet_data_config
from moat.errors import InvalidInputError

PREPROCESSING_KEY = "moat.preprocessing"  # a file-format key: never renamed
CONFIG_KEY = "moat.config"
TASK_KEY = "moat.task_metadata"
GELU_KEY = "moat.gelu"
GELU_COST_KEY = "moat.gelu_cost"
QUANTIZATION_KEY = "moat.quantization"

__all__ = ["CONFIG_KEY", "GELU_COST_KEY", "GELU_KEY", "PREPROCESSING_KEY", "QUANTIZATION_KEY",
           "TASK_KEY", "OnnxMetadata", "copy_metadata", "read_preprocessing", "write"]


def _input_size(size: Sequence[int]) -> tuple[int, int, int]:
    """(3, H, W); files written before moat settled on one shape recorded (H, W)."""
    size = tuple(int(v) for v in size)
    return size if len(size) == 3 else (3, *size)


@dataclass(frozen=True)
class OnnxMetadata:
    """moat's entries of an ONNX file's metadata_props, decoded (None: not recorded)."""

    preprocessing: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    task_metadata: dict[str, Any] = field(default_factory=dict)
    gelu: str | None = None
    gelu_cost: dict[str, Any] | None = None
    quantization: str | None = None

    @property
    def task(self) -> str | None:
        return (self.config or {}).get("task")

    @property
    def class_names(self) -> list[str]:
        return list(self.task_metadata.get("classes") or [])

    def props(self) -> dict[str, str]:
        """The metadata_props entries (strings) that encode this."""
        out = {}
        if self.preprocessing is not None:
            pre = dict(self.preprocessing)
            if "input_size" in pre:
                pre["input_size"] = list(_input_size(pre["input_size"]))
            out[PREPROCESSING_KEY] = json.dumps(pre)
        if self.config is not None:
            out[CONFIG_KEY] = json.dumps(self.config)
        if self.task_metadata:
            out[TASK_KEY] = json.dumps(self.task_metadata)
        if self.gelu is not None:
            out[GELU_KEY] = self.gelu
        if self.gelu_cost is not None:
            out[GELU_COST_KEY] = json.dumps(self.gelu_cost)
        if self.quantization is not None:
            out[QUANTIZATION_KEY] = self.quantization
        return out

    @classmethod
    def from_props(cls, props: Mapping[str, str]) -> OnnxMetadata:
        pre = json.loads(props[PREPROCESSING_KEY]) if PREPROCESSING_KEY in props else None
        if pre is not None and "input_size" in pre:
            pre["input_size"] = _input_size(pre["input_size"])
        return cls(preprocessing=pre,
                   config=json.loads(props[CONFIG_KEY]) if CONFIG_KEY in props else None,
                   task_metadata=json.loads(props.get(TASK_KEY, "{}")),
                   gelu=props.get(GELU_KEY), quantization=props.get(QUANTIZATION_KEY),
                   gelu_cost=json.loads(props[GELU_COST_KEY]) if GELU_COST_KEY in props
                   else None)

    @classmethod
    def read(cls, path: str | os.PathLike) -> OnnxMetadata:
        return cls.from_props(_props(_load(path)))


def _load(path: str | os.PathLike):
    import onnx  # optional: the `export` extra

    return onnx.load(os.fspath(path), load_external_data=False)


def _props(proto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def write(path: str | os.PathLike, props: Mapping[str, str]) -> None:
    """Set `props` in the ONNX file at `path` (in place: callers write a temporary file)."""
    import onnx

    proto = onnx.load(os.fspath(path))
    onnx.helper.set_model_props(proto, {**_props(proto), **props})
    onnx.save(proto, os.fspath(path))


def copy_metadata(source: str | os.PathLike, target: str | os.PathLike, **changes: Any) -> None:
    """Every metadata entry of the ONNX file `source` into `target`, with `changes`
    (`OnnxMetadata` fields) set; `target` is rewritten in place."""
    write(target, {**_props(_load(source)), **OnnxMetadata(**changes).props()})


def read_preprocessing(path: str | os.PathLike,
                       img_size: int | Sequence[int] | None = None) -> dict[str, Any]:
    """The preprocessing recorded in an exported file, or, for a file without it (e.g. an
    ONNX file from elsewhere), ImageNet defaults at its fixed input size or else `img_size`."""
    proto = _load(path)
    meta = OnnxMetadata.from_props(_props(proto))
    if meta.preprocessing is not None:
        return meta.preprocessing
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    if len(dims) == 4 and dims[2] and dims[3]:
        return imagenet_data_config(dims[2:])
    if img_size:
        return imagenet_data_config(img_size)
    raise InvalidInputError(f"{path} has no fixed input size and no {PREPROCESSING_KEY} metadata: "
                     "give the input size, or export it with `moat export onnx` (fixed size)")
