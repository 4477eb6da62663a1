"""Input preprocessing conventions (docs/model_zoo.md §3, docs/architecture.md §7); which
release uses which normalisation is the catalogue's (``moat.weights.catalogue``).

Official "option 1": ImageNet mean/std on 0..255 input (= these values on 0..1 input);
"option 2": (x - 127.5) / 127.5 (= mean 0.5, std 0.5 on 0..1 input).

``input_size`` is (channels, height, width) everywhere in moat (timm's convention): data
configs, the weights header, the ONNX metadata; ``size_pair`` gives the (H, W) of a size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from moat.errors import InvalidInputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALISATION = {
    "option1": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "option2": dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
}
CROP_PCT = 0.875
INTERPOLATION = "bicubic"
# the names torchvision knows (its InterpolationMode values)
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")


def imagenet_data_config(size: int | Sequence[int]) -> dict[str, Any]:
    """The default preprocessing at `size`: ImageNet mean/std, CROP_PCT, INTERPOLATION."""
    return dict(input_size=(3, *size_pair(size)), crop_pct=CROP_PCT,
                interpolation=INTERPOLATION, **NORMALISATION["option1"])


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
