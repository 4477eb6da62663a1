"""Input preprocessing facts of the released checkpoints (docs/model_zoo.md §3,
docs/architecture.md §7).

Official "option 1": ImageNet mean/std on 0..255 input (= these values on 0..1 input);
"option 2": (x - 127.5) / 127.5 (= mean 0.5, std 0.5 on 0..1 input).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from moat.errors import InvalidInputError
from moat.models.config import MODEL_CONFIGS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALISATION = {
    "option1": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "option2": dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
}
# The released ImageNet-22K checkpoints (MOAT-2/3/4) use option 2; all others option 1.
VARIANT_NORMALISATION = {name: "option2" if name in ("moat_2", "moat_3", "moat_4") else "option1"
                         for name in MODEL_CONFIGS}
CROP_PCT = 0.875
INTERPOLATION = "bicubic"
# the names torchvision knows (its InterpolationMode values)
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")


def imagenet_data_config(size: int | Sequence[int]) -> dict[str, Any]:
    """The default preprocessing at `size`: ImageNet mean/std, CROP_PCT, INTERPOLATION."""
    return dict(input_size=size_pair(size), crop_pct=CROP_PCT, interpolation=INTERPOLATION,
                **NORMALISATION["option1"])


def variant_data_config(name: str) -> dict[str, Any]:
    """Resize/crop/normalisation of a variant's released checkpoint, at its native size."""
    return {**imagenet_data_config(MODEL_CONFIGS[name].native_resolution),
            **NORMALISATION[VARIANT_NORMALISATION[name]]}


def size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    """An image size as (height, width): 224 -> (224, 224), [224] -> (224, 224),
    (224, 320) -> (224, 320)."""
    if isinstance(size, int):
        return size, size
    values = tuple(int(v) for v in size)
    if len(values) == 1:
        return values[0], values[0]
    if len(values) != 2:
        raise InvalidInputError(f"an image size is H or (H, W), got {size!r}")
    return values
