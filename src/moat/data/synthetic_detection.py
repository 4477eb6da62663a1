"""A generated detection and instance-segmentation dataset in COCO format, for `moat demo --task
detection` and the tests.

Each image holds zero to a few non-overlapping shapes (circle, square, triangle, star, ...: the
shapes of `moat.data.synthetic`) with random colour, size, position and rotation on a smooth noisy
background. The files are ordinary PNGs plus `annotations/instances_{train,val}.json`, read by the
same COCO loader as real data. Square, triangle and diamond outlines are stored as polygons (their
exact corners), the other shapes as compressed RLE masks, so both COCO mask encodings are used.

Every image has its own random generator seeded by (seed, split, index): the output is identical
for a seed whatever the order or subset generated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from moat.data.synthetic import SHAPES, _colour_far_from, reuse_or_clear
from moat.errors import InvalidInputError

_FORMAT_VERSION = 1  # bump when rendering changes, so cached datasets are regenerated
DEFAULT_CLASSES = ("circle", "square", "triangle")

# Corners, in the shape's unit frame (see moat.data.synthetic), of the shapes stored as polygons.
_TRIANGLE = [(np.cos(t), np.sin(t)) for t in np.deg2rad([270.0, 30.0, 150.0])]
POLYGON_SHAPES: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": _TRIANGLE,
    "diamond": [(0.0, -1.0), (0.6, 0.0), (0.0, 1.0), (-0.6, 0.0)],
}


@dataclass(frozen=True)
class SyntheticDetection:
    """What `write_synthetic_detection` wrote under `root`."""

    root: Path
    classes: list[str]
    counts: dict[str, int]  # images per split

    def images(self, split: str) -> Path:
        return self.root / split

    def annotations(self, split: str) -> Path:
        return self.root / "annotations" / f"instances_{split}.json"


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def render_scene(
    rng: np.random.Generator,
    classes: list[str],
    size: int = 128,
    max_objects: int = 3,
    radius: tuple[float, float] = (0.08, 0.2),
    empty_fraction: float = 0.05,
) -> tuple[np.ndarray, list[dict]]:
    """One (size, size, 3) uint8 image and its objects: dicts with `label` (index into classes),
    `mask` (bool, size x size), `bbox` (COCO x, y, w, h) and `polygon` (flat list, or None)."""
    s2 = 2 * size
    bg = rng.uniform(0, 255, 3).astype(np.float32)
    low = np.clip(bg + rng.normal(0, 35, (4, 4, 3)), 0, 255).astype(np.uint8)
    canvas = np.asarray(Image.fromarray(low).resize((s2, s2), Image.BICUBIC), dtype=np.float32)
    coords = (np.arange(s2, dtype=np.float32) + 0.5) / 2  # pixel centres of the 2x grid
    num = 0 if rng.uniform() < empty_fraction else int(rng.integers(1, max_objects + 1))

    placed: list[tuple[float, float, float]] = []
    objects: list[dict] = []
    for _ in range(num):
        label = int(rng.integers(len(classes)))
        name = classes[label]
        mask_fn, max_rot = SHAPES[name]
        for _attempt in range(50):  # rejection sampling: shapes never touch
            r = rng.uniform(*radius) * size
            margin = 1.15 * r + 1  # rotated square corners reach 0.8 * sqrt(2) r
            cx, cy = rng.uniform(margin, size - margin, 2)
            if all(np.hypot(cx - x, cy - y) > 1.2 * (r + q) + 2 for x, y, q in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        theta = np.deg2rad(rng.uniform(-max_rot, max_rot))
        cos, sin = np.cos(theta), np.sin(theta)
        dx, dy = coords[None, :] - np.float32(cx), coords[:, None] - np.float32(cy)
        a = (dx * np.float32(cos) + dy * np.float32(sin)) / np.float32(r)
        b = (dy * np.float32(cos) - dx * np.float32(sin)) / np.float32(r)
        inside, pattern = mask_fn(a, b, rng.uniform(0.25, 0.4))
        fg = _colour_far_from(rng, bg)
        layer = fg if pattern is None else np.where(pattern[..., None], fg,
                                                    _colour_far_from(rng, fg))
        canvas = np.where(inside[..., None], layer, canvas)
        # The 1x mask: pixels at least half covered by the shape.
        cover = inside.reshape(size, 2, size, 2).mean(axis=(1, 3))
        mask = cover >= 0.5
        polygon = None
        if name in POLYGON_SHAPES:
            # Inverse of the (a, b) frame: pixel = centre + r * R(theta) (a, b).
            pts = [(cx + r * (u * cos - v * sin), cy + r * (u * sin + v * cos))
                   for u, v in POLYGON_SHAPES[name]]
            polygon = [round(float(c), 2) for p in pts for c in p]
            xs, ys = polygon[0::2], polygon[1::2]
            bbox = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
        else:
            rows, cols = np.nonzero(mask)
            bbox = [float(cols.min()), float(rows.min()),
                    float(cols.max() - cols.min() + 1), float(rows.max() - rows.min() + 1)]
        objects.append(dict(label=label, mask=mask, bbox=[round(v, 2) for v in bbox],
                            polygon=polygon))

    img = (canvas[0::2, 0::2] + canvas[1::2, 0::2] + canvas[0::2, 1::2] + canvas[1::2, 1::2]) / 4
    img += rng.normal(0, 8, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), objects


def write_synthetic_detection(
    root: str | Path,
    num_train: int = 600,
    num_val: int = 100,
    img_size: int = 128,
    classes: tuple[str, ...] | list[str] = DEFAULT_CLASSES,
    max_objects: int = 3,
    radius: tuple[float, float] = (0.08, 0.2),
    empty_fraction: float = 0.05,
    seed: int = 0,
) -> SyntheticDetection:
    """Write the dataset under `root` (PNG images + COCO instances JSON), or reuse it.

    Each image holds 0 (with probability `empty_fraction`) to `max_objects` shapes of
    `classes`, with radii drawn from `radius` (fractions of `img_size`); fewer when they do
    not fit without touching.

    `root` must be empty, missing, or a dataset written before with the same parameters
    (recognised by `synthetic_detection.json`, written last, so an interrupted write is redone).
    A dataset written with other parameters is replaced; other folders are refused.
    """
    classes = list(classes)
    unknown = [c for c in classes if c not in SHAPES]
    if unknown or not classes:
        raise InvalidInputError(f"unknown shape(s) {unknown}; choose from {list(SHAPES)}")
    root = Path(root)
    counts = {"train": int(num_train), "val": int(num_val)}
    params = dict(version=_FORMAT_VERSION, classes=classes, counts=counts, img_size=img_size,
                  max_objects=max_objects, radius=[float(r) for r in radius],
                  empty_fraction=empty_fraction, seed=seed)
    result = SyntheticDetection(root, classes, counts)
    if reuse_or_clear(root, "synthetic_detection.json", params, {"train", "val", "annotations"},
                      "synthetic detection dataset"):
        return result

    (root / "annotations").mkdir(parents=True)
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"}
                  for i, name in enumerate(classes)]
    for split_id, (split, n) in enumerate(counts.items()):
        (root / split).mkdir()
        images, annotations = [], []
        for i in range(n):
            rng = np.random.default_rng([seed, split_id, i])
            img, objects = render_scene(rng, classes, img_size, max_objects, tuple(radius),
                                        empty_fraction)
            file_name = f"{i:06d}.png"
            Image.fromarray(img).save(root / split / file_name, compress_level=1)
            image_id = i + 1
            images.append({"id": image_id, "file_name": file_name,
                           "height": img_size, "width": img_size})
            for obj in objects:
                seg = [obj["polygon"]] if obj["polygon"] is not None else _rle(obj["mask"])
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id,
                    "category_id": obj["label"] + 1, "bbox": obj["bbox"],
                    "area": float(obj["mask"].sum()), "iscrowd": 0, "segmentation": seg,
                })
        coco = {"info": {"description": f"moat synthetic detection ({split})"},
                "images": images, "annotations": annotations, "categories": categories}
        result.annotations(split).write_text(json.dumps(coco))
    (root / "synthetic_detection.json").write_text(json.dumps(params, indent=1))
    return result
