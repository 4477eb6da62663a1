"""A generated segmentation dataset for `moat demo --task segmentation`: real files in the
generic folder layout (`train/{images,masks}`, `val/{images,masks}`).

Each image holds 1-3 shapes (circle, square, triangle, cross; ring as a fifth class on
request) of random size, position and rotation, drawn over one another on a textured
background (a smooth grey-ish field, stripes of random orientation and period, pixel noise).
The class of a pixel is the shape it belongs to (0 = background). Each class has its own band
of hues (a tenth of the colour circle) with random saturation and brightness: colour hints the
class, which is what lets a 3M-parameter model learn the task from scratch in minutes on a CPU
(with colours that say nothing about the class it needs several times longer); the outlines
must still be found against the texture and between overlapping shapes, which is what limits
the IoU. Masks are palette PNGs whose *indices* are the class ids (the palette only makes them
viewable).

Every image has its own generator seeded by (seed, split, index), so a seed always gives the
same files, whatever subset is written. Writing 600 128x128 pairs takes a few seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from moat.data.synthetic import reuse_or_clear
from moat.errors import InvalidInputError

_FORMAT_VERSION = 1  # bump when rendering changes, so cached datasets are regenerated


def _circle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a * a + b * b <= 1.0


def _square(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum(abs(a), abs(b)) <= 0.8


def _triangle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inside = np.ones(a.shape, dtype=bool)
    for k in range(3):  # equilateral, edges at inradius 0.6 (vertices at radius 1.2)
        angle = np.pi / 2 + 2 * np.pi * k / 3
        inside &= a * np.cos(angle) + b * np.sin(angle) <= 0.6
    return inside


def _ring(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    r2 = a * a + b * b
    return (r2 <= 1.0) & (r2 >= 0.5 ** 2)


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return ((abs(a) <= 1) & (abs(b) <= 0.4)) | ((abs(b) <= 1) & (abs(a) <= 0.4))


# class id = index + 1 (0 is background); value: (mask function, max rotation in degrees)
SHAPES = {"circle": (_circle, 0), "square": (_square, 30), "triangle": (_triangle, 180),
          "cross": (_cross, 30), "ring": (_ring, 0)}

PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200],
                    [245, 130, 48], [145, 30, 180], [70, 240, 240]], dtype=np.uint8)


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """[size, size, 3] float background of low saturation: a smooth grey-ish field, stripes of
    random orientation and period, and (added later) pixel noise."""
    grey = rng.uniform(60, 190)
    base = grey + rng.uniform(-15, 15, 3)
    low = np.clip(base + rng.normal(0, 12, (4, 4, 3)) + rng.normal(0, 25, (4, 4, 1)), 0, 255)
    field = np.asarray(Image.fromarray(low.astype(np.uint8)).resize((size, size), Image.BICUBIC),
                       np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(4, 14)
    coords = np.arange(size, dtype=np.float32)
    phase = (coords[None, :] * np.cos(angle) + coords[:, None] * np.sin(angle)) / period
    return field + (np.sin(2 * np.pi * phase) * rng.uniform(6, 18))[..., None]


def _class_colour(rng: np.random.Generator, class_id: int, classes: int) -> np.ndarray:
    """A saturated colour in the class's own band of hues (width 0.1 of the colour circle),
    with random saturation and brightness."""
    hue = (class_id + rng.uniform(-0.2, 0.2)) / classes
    sat, val = rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0)
    rgb = np.clip(np.abs((hue * 6 + np.array([0.0, 4.0, 2.0])) % 6 - 3) - 1, 0, 1)
    return (val * (1 - sat + sat * rgb) * 255).astype(np.float32)


def render_sample(rng: np.random.Generator, size: int = 128, num_shapes: int = 3,
                  classes: int = len(SHAPES)) -> tuple[np.ndarray, np.ndarray]:
    """One (image [size, size, 3] uint8, mask [size, size] uint8) pair.

    Shapes are drawn at 2x and averaged down (anti-aliased edges); the mask is the shape
    test at each pixel's centre, so it matches the image's edges to half a pixel.
    """
    names = list(SHAPES)[:classes]
    s2 = 2 * size
    canvas = np.asarray(Image.fromarray(np.clip(_texture(rng, size), 0, 255).astype(np.uint8))
                        .resize((s2, s2), Image.NEAREST), np.float32).copy()
    mask = np.zeros((size, size), np.uint8)
    hi = (np.arange(s2, dtype=np.float32) + 0.5) / 2      # 2x pixel centres, in 1x units
    lo = np.arange(size, dtype=np.float32) + 0.5          # 1x pixel centres
    for _ in range(int(rng.integers(1, num_shapes + 1))):
        class_id = int(rng.integers(len(names)))
        shape_fn, max_rot = SHAPES[names[class_id]]
        r = rng.uniform(0.15, 0.28) * size
        cx, cy = rng.uniform(r * 0.6, size - r * 0.6, 2)
        theta = np.deg2rad(rng.uniform(-max_rot, max_rot))
        cos, sin = np.float32(np.cos(theta) / r), np.float32(np.sin(theta) / r)

        def inside(coords: np.ndarray) -> np.ndarray:
            dx, dy = coords[None, :] - np.float32(cx), coords[:, None] - np.float32(cy)
            return shape_fn(dx * cos + dy * sin, dy * cos - dx * sin)

        colour = _class_colour(rng, class_id, len(names))
        canvas[inside(hi)] = colour
        mask[inside(lo)] = class_id + 1
    img = (canvas[0::2, 0::2] + canvas[1::2, 0::2] + canvas[0::2, 1::2] + canvas[1::2, 1::2]) / 4
    img += rng.normal(0, 6, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask


@dataclass(frozen=True)
class SyntheticSegmentation:
    """What `write_segmentation_dataset` wrote (the generic folder layout)."""

    root: Path
    classes: list[str]  # index = class id; "background" first
    counts: dict[str, int]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def write_segmentation_dataset(
    root: str | Path,
    num_shapes: int = 4,
    train_size: int = 480,
    val_size: int = 120,
    img_size: int = 128,
    seed: int = 0,
) -> SyntheticSegmentation:
    """Write the dataset under `root` (or reuse an identical one already there).

    `root` must be missing, empty or a dataset written here before (recognised by its
    `segmentation.json`, written last, so an interrupted write is redone, not reused).
    The first `num_shapes` shapes of `SHAPES` are the classes 1..num_shapes (0: background).
    """
    if not 1 <= num_shapes <= len(SHAPES):
        raise InvalidInputError(f"num_shapes must be between 1 and {len(SHAPES)}, got {num_shapes}")
    root = Path(root)
    classes = ["background", *list(SHAPES)[:num_shapes]]
    sizes = {"train": train_size, "val": val_size}
    params = dict(version=_FORMAT_VERSION, classes=classes, sizes=sizes, img_size=img_size,
                  seed=seed)
    result = SyntheticSegmentation(root, classes, dict(sizes))
    if reuse_or_clear(root, "segmentation.json", params, set(sizes),
                      "synthetic segmentation dataset"):
        return result

    palette = np.zeros((256, 3), np.uint8)
    palette[:len(PALETTE)] = PALETTE
    palette[255] = 255  # ignore: white
    for split_id, (split, n) in enumerate(sizes.items()):
        (root / split / "images").mkdir(parents=True, exist_ok=True)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng([seed, split_id, i])
            image, mask = render_sample(rng, img_size, classes=num_shapes)
            Image.fromarray(image).save(root / split / "images" / f"{i:05d}.png",
                                        compress_level=1)
            m = Image.fromarray(mask)  # mode L; putpalette makes it P with the same indices
            m.putpalette(palette.reshape(-1).tolist())
            m.save(root / split / "masks" / f"{i:05d}.png", compress_level=1)
    (root / "segmentation.json").write_text(json.dumps(params, indent=1))
    return result
