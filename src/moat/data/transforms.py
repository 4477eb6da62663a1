"""Train/eval transforms, MixUp/CutMix and the matching loss, on torchvision.transforms.v2.

Geometric ops run on the PIL image (before ToImage), as in timm: PIL's bicubic resize is what the
published eval accuracies were measured with, and it keeps train and eval resampling identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from moat.data.preprocessing import CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, INTERPOLATION, size_pair
from moat.errors import InvalidInputError
from moat.weights.loader import data_config

Size = int | tuple[int, int]
BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _interpolation(name: str | v2.InterpolationMode) -> v2.InterpolationMode:
    if isinstance(name, v2.InterpolationMode):
        return name
    try:
        return v2.InterpolationMode(name.lower())
    except ValueError:
        choices = ", ".join(m.value for m in v2.InterpolationMode)
        raise InvalidInputError(f"unknown interpolation {name!r}; use one of: {choices}") from None


def _to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list[nn.Module]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def train_transform(
    img_size: Size,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = INTERPOLATION,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    randaugment: tuple[int, int] | None = (2, 9),
    random_erasing: float = 0.0,
) -> v2.Compose:
    """Inception-style crop + flip + RandAugment, then a normalized float tensor (C, H, W).

    `randaugment` is (num_ops, magnitude) on torchvision's 0..30 scale, or None to turn it off.
    RandAugment fills uncovered areas with the mean colour (as timm does) so rotations and shears
    do not add black borders the eval images never have. `random_erasing` is the probability of
    erasing one rectangle with per-pixel normal noise (timm's 'pixel' mode); it runs after
    Normalize so the noise matches the normalized statistics.
    """
    interp = _interpolation(interpolation)
    ops: list[nn.Module] = [
        v2.RandomResizedCrop(size_pair(img_size), scale=scale, interpolation=interp, antialias=True)
    ]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    if randaugment is not None:
        num_ops, magnitude = randaugment
        fill = [round(255 * m) for m in mean]
        ops.append(v2.RandAugment(num_ops=num_ops, magnitude=magnitude, interpolation=interp,
                                  fill=fill))
    ops += _to_normalized_tensor(mean, std)
    if random_erasing > 0:
        ops.append(v2.RandomErasing(p=random_erasing, value="random"))
    return v2.Compose(ops)


def eval_resize_size(img_size: Size, crop_pct: float) -> Size:
    """Resize target before the center crop: floor(img_size / crop_pct), as in timm."""
    if not 0 < crop_pct <= 1:
        raise InvalidInputError(f"crop_pct must be in (0, 1], got {crop_pct}")
    h, w = size_pair(img_size)
    # The epsilon keeps e.g. 224 / 0.875 at 256 whatever the float rounding.
    sh, sw = (math.floor(s / crop_pct + 1e-6) for s in (h, w))
    return sh if h == w else (sh, sw)


def eval_transform(
    img_size: Size,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = INTERPOLATION,
    crop_pct: float = CROP_PCT,
) -> v2.Compose:
    """Resize the shorter side to img_size / crop_pct, center-crop img_size, normalize.

    For non-square img_size both sides are resized (aspect ratio not kept), as timm does.
    """
    interp = _interpolation(interpolation)
    return v2.Compose([
        v2.Resize(eval_resize_size(img_size, crop_pct), interpolation=interp, antialias=True),
        v2.CenterCrop(size_pair(img_size)),
        *_to_normalized_tensor(mean, std),
    ])


class MixUpCutMix:
    """Mixes a batch with MixUp or CutMix (one of the two per batch) and smooths the soft targets.

    Smoothing is folded in here because after mixing the targets are no longer class indices that
    nn.CrossEntropyLoss could smooth; pair this with `SoftTargetCrossEntropy` (unsmoothed).
    A plain class, not a closure, so DataLoader workers can pickle it inside the collate function.
    """

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float,
                 label_smoothing: float = 0.0) -> None:
        ops = []
        if mixup_alpha > 0:
            ops.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            ops.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        if not ops:
            raise InvalidInputError("MixUpCutMix needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.mix = ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images, soft = self.mix(images, targets)
        if self.label_smoothing > 0:
            soft = soft * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_classes
        return images, soft


def mixup_cutmix(
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    label_smoothing: float = 0.0,
) -> MixUpCutMix | None:
    """The batch transform for (images (B,C,H,W), int64 targets (B,)) -> (images, soft (B,K)).

    None when both alphas are 0, so callers can write `if mixer: images, targets = mixer(...)`
    and pick the loss with `classification_loss(label_smoothing, mixing=mixer is not None)`.
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    return MixUpCutMix(num_classes, mixup_alpha, cutmix_alpha, label_smoothing)


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy against probability targets (B, K); class-index targets (B,) also work."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == logits.ndim - 1:
            return F.cross_entropy(logits, target)
        return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def classification_loss(label_smoothing: float = 0.0, mixing: bool = False) -> nn.Module:
    """The training loss matching the batch transform.

    With mixing the smoothing is already in the soft targets (see MixUpCutMix), so the loss must
    not smooth again; without it nn.CrossEntropyLoss smooths the hard labels itself.
    """
    if mixing:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def create_transform(model_or_name: Any, *, img_size: int | Sequence[int] | None = None,
                     crop_pct: float | None = None, interpolation: str | None = None,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                     ) -> v2.Compose:
    """The evaluation transform (torchvision.transforms.v2) of a checkpoint.

    PIL image or uint8 tensor in, normalised float32 CxHxW tensor out. Any argument given
    overrides the checkpoint's value, e.g. ``img_size=448`` to evaluate at another size.
    """
    config = data_config(model_or_name)
    size = img_size or config["input_size"][1:]
    if isinstance(size, Sequence) and size[0] == size[-1]:
        size = int(size[0])
    return eval_transform(size,
                          mean=mean or config["mean"], std=std or config["std"],
                          interpolation=interpolation or config["interpolation"],
                          crop_pct=crop_pct or config["crop_pct"])
