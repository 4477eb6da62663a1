"""Drawing segmentation masks: a colour palette, masks as palette PNGs, overlays."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

from moat.data.masks import IGNORE_INDEX
from moat.atomic import atomic_output


def color_palette(num_classes: int) -> np.ndarray:
    """[max(K, 256), 3] uint8 colours (the PASCAL VOC bit pattern; index 255 white)."""
    n = max(num_classes, 256)
    palette = np.zeros((n, 3), np.uint8)
    for index in range(n):
        c, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[index] = (r, g, b)
    if num_classes <= 255:
        palette[255] = 255
    return palette


def save_mask_png(mask: np.ndarray, path: str | os.PathLike, num_classes: int,
                  palette: np.ndarray | None = None) -> None:
    """Class ids as a palette PNG (K <= 256; viewable colours, indices = ids), else 16-bit."""
    if num_classes <= 256 and mask.max(initial=0) < 256:
        img = Image.fromarray(mask.astype(np.uint8))
        palette = color_palette(num_classes) if palette is None else palette
        img.putpalette(palette[:256].reshape(-1).tolist())
    else:
        img = Image.fromarray(mask.astype(np.uint16))
    with atomic_output(path) as tmp:  # never a half-written mask under the user's name
        img.save(tmp, format="PNG")


def overlay(image: np.ndarray, mask: np.ndarray, num_classes: int, alpha: float = 0.5,
            ignore_index: int = IGNORE_INDEX, palette: np.ndarray | None = None) -> np.ndarray:
    """Blend class colours (`palette`, default `color_palette`) over an RGB uint8 image
    (ignored pixels left as they are)."""
    palette = color_palette(num_classes) if palette is None else palette
    colours = palette[np.clip(mask, 0, len(palette) - 1)]
    blended = image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha
    blended[mask == ignore_index] = image[mask == ignore_index]
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def add_legend(image: np.ndarray, classes: dict[int, str], palette: np.ndarray,
               row: int = 12) -> np.ndarray:
    """`image` with a legend below it: a colour swatch and the name of each class in
    `classes` ({class id: name}, e.g. those predicted)."""
    height, width = image.shape[:2]
    legend = Image.new("RGB", (width, row * max(len(classes), 1) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    for i, (class_id, name) in enumerate(sorted(classes.items())):
        y = 2 + i * row
        draw.rectangle([2, y, 2 + row - 3, y + row - 3],
                       fill=tuple(int(v) for v in palette[class_id]), outline=(0, 0, 0))
        draw.text((row + 3, y), f"{class_id} {name}", fill=(0, 0, 0))
    return np.concatenate([image, np.asarray(legend)], axis=0)
