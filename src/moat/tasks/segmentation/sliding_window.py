"""Segmentation inference: whole-image or sliding-window logits at the input size, with
optional flip testing (`segment`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from moat.data.preprocessing import size_pair
from moat.errors import InvalidInputError


def slide_inference(model: nn.Module, images: Tensor, crop_size: int | Sequence[int],
                    stride: int | Sequence[int] | None = None) -> Tensor:
    """Logits [B, K, H, W] from overlapping crops, averaged where they overlap.

    Windows of `crop_size` step by `stride` (default 2/3 of the crop); the last window of a
    row or column is shifted to end at the border. An image smaller than the crop along a
    side is covered by one window of the image's size there (so a window that covers the
    image gives exactly whole-image inference).
    """
    ch, cw = size_pair(crop_size)
    sh, sw = size_pair(stride) if stride is not None else (max(1, ch * 2 // 3),
                                                          max(1, cw * 2 // 3))
    if min(ch, cw, sh, sw) < 1:
        raise InvalidInputError(f"crop_size and stride must be positive, got {crop_size}, {stride}")
    batch, _, height, width = images.shape
    ch, cw = min(ch, height), min(cw, width)
    rows = max(math.ceil((height - ch) / sh), 0) + 1
    cols = max(math.ceil((width - cw) / sw), 0) + 1
    logits = count = None
    for r in range(rows):
        for c in range(cols):
            y0, x0 = min(r * sh, height - ch), min(c * sw, width - cw)
            out = model(images[:, :, y0:y0 + ch, x0:x0 + cw]).float()
            if logits is None:
                logits = out.new_zeros(batch, out.shape[1], height, width)
                count = out.new_zeros(1, 1, height, width)
            logits[:, :, y0:y0 + ch, x0:x0 + cw] += out
            count[:, :, y0:y0 + ch, x0:x0 + cw] += 1
    return logits / count


def segment(model: nn.Module, images: Tensor, *, mode: str = "whole",
            crop_size: int | Sequence[int] | None = None,
            stride: int | Sequence[int] | None = None, flip: bool = False,
            output_size: Sequence[int] | None = None) -> Tensor:
    """Logits [B, K, H, W] for normalised images [B, 3, H, W].

    mode "whole" runs the model on the full image; "slide" uses `slide_inference` with
    `crop_size` (required) and `stride`. `flip` averages with the mirrored prediction.
    `output_size` resizes the logits (bilinear), e.g. to the annotation's size.
    """
    if mode == "whole":
        def run(x: Tensor) -> Tensor:
            return model(x)
    elif mode == "slide":
        if crop_size is None:
            raise InvalidInputError("sliding-window inference needs crop_size")

        def run(x: Tensor) -> Tensor:
            return slide_inference(model, x, crop_size, stride)
    else:
        raise InvalidInputError(f"unknown inference mode {mode!r}; use 'whole' or 'slide'")
    logits = run(images).float()  # float32 also under autocast
    if flip:
        logits = (logits + run(images.flip(-1)).float().flip(-1)) / 2
    if output_size is not None and tuple(logits.shape[-2:]) != tuple(output_size):
        logits = F.interpolate(logits, size=tuple(output_size), mode="bilinear",
                               align_corners=False)
    return logits
