"""A generated shapes dataset for `moat demo`: real image files in the image-folder layout.

The files go through the same loader as user data (decode, transforms, workers), so the demo
exercises the real pipeline. Each image is one shape on a textured, noisy background with a
random colour, size, position and rotation: colour or any single pixel says nothing about the
class, yet a small network learns it to >95% in minutes at 64x64.

Each image has its own random generator seeded by (seed, split, class, index), so the output is
identical for a seed whatever the order or subset generated.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from moat.errors import InvalidInputError

Mask = Callable[[np.ndarray, np.ndarray, float], tuple[np.ndarray, np.ndarray | None]]
_FORMAT_VERSION = 1  # bump when rendering changes, so cached datasets are regenerated


def _circle(a, b, p):
    return a * a + b * b <= 1.0, None


def _ring(a, b, p):
    r2 = a * a + b * b
    return (r2 <= 1.0) & (r2 >= 0.55 ** 2), None


def _square(a, b, p):
    return np.maximum(abs(a), abs(b)) <= 0.8, None


def _diamond(a, b, p):
    return abs(a) / 0.6 + abs(b) <= 1.0, None


def _cross(a, b, p):
    return ((abs(a) <= 1) & (abs(b) <= 0.3)) | ((abs(b) <= 1) & (abs(a) <= 0.3)), None


def _triangle(a, b, p):
    inside = np.ones(a.shape, dtype=bool)
    for k in range(3):  # the three edges lie at the inradius (0.5) opposite each vertex
        angle = np.pi / 2 + 2 * np.pi * k / 3
        inside &= a * np.cos(angle) + b * np.sin(angle) <= 0.5
    return inside, None


def _star(a, b, p):
    # Fold the angle into one half-spike, then test against the edge from the outer point
    # (1, 0) to the inner vertex at radius 0.4, angle pi/5.
    rho, phi = np.hypot(a, b), np.arctan2(b, a) + np.pi / 2
    d = np.abs(np.mod(phi + np.pi / 5, 2 * np.pi / 5) - np.pi / 5)
    ex, ey = 0.4 * np.cos(np.pi / 5) - 1.0, 0.4 * np.sin(np.pi / 5)
    return ex * rho * np.sin(d) - ey * (rho * np.cos(d) - 1.0) >= 0, None


def _hstripes(a, b, p):
    return _square(a, b, p)[0], np.floor(b / p) % 2 == 0


def _vstripes(a, b, p):
    return _square(a, b, p)[0], np.floor(a / p) % 2 == 0


def _checkerboard(a, b, p):
    return _square(a, b, p)[0], (np.floor(a / p) + np.floor(b / p)) % 2 == 0


# name -> (mask function, max rotation in degrees). Shapes that a rotation would turn into another
# class (square/diamond, stripes, cross/x) turn by at most 20 degrees.
SHAPES: dict[str, tuple[Mask, float]] = {
    "circle": (_circle, 180), "square": (_square, 20), "triangle": (_triangle, 180),
    "cross": (_cross, 20), "star": (_star, 180), "ring": (_ring, 180),
    "hstripes": (_hstripes, 20), "vstripes": (_vstripes, 20),
    "checkerboard": (_checkerboard, 20), "diamond": (_diamond, 20),
}


def _colour_far_from(rng: np.random.Generator, *others: np.ndarray) -> np.ndarray:
    for _ in range(100):
        c = rng.uniform(0, 255, 3).astype(np.float32)
        if all(np.linalg.norm(c - o) > 110 for o in others):
            return c
    return np.float32(255.0) - others[0]


def render_shape(name: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One (size, size, 3) uint8 image of the named shape, drawn at 2x and averaged down so edges
    are anti-aliased."""
    mask_fn, max_rot = SHAPES[name]
    s2 = 2 * size
    bg = rng.uniform(0, 255, 3).astype(np.float32)
    fg = _colour_far_from(rng, bg)
    # Background: a smooth random colour field (4x4 noise upsampled) around the base colour.
    low = np.clip(bg + rng.normal(0, 35, (4, 4, 3)), 0, 255).astype(np.uint8)
    canvas = np.asarray(Image.fromarray(low).resize((s2, s2), Image.BICUBIC), dtype=np.float32)

    r = rng.uniform(0.22, 0.38) * size
    cx, cy = rng.uniform(r, size - r, 2)
    theta = np.deg2rad(rng.uniform(-max_rot, max_rot))
    cos, sin = np.float32(np.cos(theta) / r), np.float32(np.sin(theta) / r)
    coords = (np.arange(s2, dtype=np.float32) + 0.5) / 2
    dx, dy = coords[None, :] - np.float32(cx), coords[:, None] - np.float32(cy)
    a, b = dx * cos + dy * sin, dy * cos - dx * sin
    mask, pattern = mask_fn(a, b, rng.uniform(0.25, 0.4))
    if pattern is None:
        layer = fg
    else:
        second = _colour_far_from(rng, fg)
        layer = np.where(pattern[..., None], fg, second)
    canvas = np.where(mask[..., None], layer, canvas)

    img = (canvas[0::2, 0::2] + canvas[1::2, 0::2] + canvas[0::2, 1::2] + canvas[1::2, 1::2]) / 4
    img += rng.normal(0, 8, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class ShapesDataset:
    """What `write_shapes_dataset` wrote: `root/train/<class>/` and `root/val/<class>/`."""

    root: Path
    classes: list[str]
    counts: dict[str, int]  # images per split, e.g. {"train": 2000, "val": 500}

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def val_dir(self) -> Path:
        return self.root / "val"


def reuse_or_clear(root: Path, marker: str, params: dict, parts: set[str], what: str) -> bool:
    """True if `root` already holds the generated dataset described by `params`.

    The JSON `marker` file is written last by every generator, so a folder without it holds
    at most the leftovers (`parts`) of an interrupted write; those are removed, as is a
    dataset written with other parameters. Anything else in `root` is refused: the folder is
    the user's, not ours to empty.
    """
    marker_file = root / marker
    if marker_file.is_file():
        if json.loads(marker_file.read_text()) == params:
            return True
        marker_file.unlink()
    elif root.exists() and not {p.name for p in root.iterdir()} <= parts:
        raise FileExistsError(f"{str(root)!r} is not empty and holds no {what}; "
                              "choose an empty or new folder")
    for name in parts:
        shutil.rmtree(root / name, ignore_errors=True)
    return False


def write_shapes_dataset(
    root: str | Path,
    num_classes: int = 10,
    train_per_class: int = 200,
    val_per_class: int = 50,
    img_size: int = 64,
    seed: int = 0,
    image_format: str = "png",
) -> ShapesDataset:
    """Write the shapes dataset under `root`, or reuse it if it is already there.

    `root` must be empty, missing, or a shapes dataset written before (recognised by its
    `shapes.json`, which is written last, so an interrupted write is redone, not reused): other
    folders are refused rather than overwritten. `image_format` is "png" (lossless) or "jpeg".
    """
    if not 1 <= num_classes <= len(SHAPES):
        raise InvalidInputError(f"num_classes must be between 1 and {len(SHAPES)}, got {num_classes}")
    if image_format not in ("png", "jpeg"):
        raise InvalidInputError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    root = Path(root)
    classes = list(SHAPES)[:num_classes]
    per_class = {"train": train_per_class, "val": val_per_class}
    params = dict(version=_FORMAT_VERSION, classes=classes, per_class=per_class,
                  img_size=img_size, seed=seed, image_format=image_format)
    result = ShapesDataset(root, classes, {k: n * num_classes for k, n in per_class.items()})
    if reuse_or_clear(root, "shapes.json", params, set(per_class), "shapes dataset"):
        return result

    ext = "png" if image_format == "png" else "jpg"
    for split_id, (split, n) in enumerate(per_class.items()):
        for class_id, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, split_id, class_id, i])
                img = Image.fromarray(render_shape(name, rng, img_size))
                options = {"compress_level": 1} if ext == "png" else {"quality": 92}
                img.save(folder / f"{name}_{i:05d}.{ext}", **options)
    (root / "shapes.json").write_text(json.dumps(params, indent=1))
    return result
