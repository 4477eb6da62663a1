"""What the pre-flight check (`moat data check`, run by `moat train` and `moat eval` too)
costs on larger datasets; prints a table. A benchmark, not a test.

    python benchmarks/data_check.py [--work DIR] [--images N] [--boxes K] [--size S]

Writes once (kept in --work): a segmentation folder of N SxS (default 64) noise JPEGs with
palette-PNG masks (4 classes), and a COCO detection folder of N SxS images with K boxes
each (N x K annotations); a tenth as many again for validation. Times the check of each (`Task.check_data`, both splits), best of 2.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

def _write_images(folder: Path, n: int, size: int, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=80)


def segmentation_set(root: Path, n: int, size: int) -> Path:
    if (root / "done").exists():
        return root
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", max(1, n // 10))):
        _write_images(root / split / "images", count, size, rng)
        (root / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            mask = np.zeros((size, size), np.uint8)
            for k in range(1, 4):
                y, x = rng.integers(0, size - 16, 2)
                mask[y:y + 16, x:x + 16] = k
            png = Image.fromarray(mask, mode="P")
            png.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0] + [0] * 756)
            png.save(root / split / "masks" / f"{i:05d}.png")
    (root / "done").touch()
    return root


def detection_set(root: Path, n: int, boxes: int, size: int) -> Path:
    if (root / "done").exists():
        return root
    rng = np.random.default_rng(0)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count in (("train", n), ("val", max(1, n // 10))):
        _write_images(root / split, count, size, rng)
        images = [{"id": i + 1, "file_name": f"{i:05d}.jpg", "width": size, "height": size}
                  for i in range(count)]
        xy = rng.integers(0, size - 16, (count * boxes, 2)).tolist()
        anns = [{"id": j + 1, "image_id": j // boxes + 1, "category_id": 1 + j % 5,
                 "bbox": [x, y, 12, 12], "area": 144, "iscrowd": 0}
                for j, (x, y) in enumerate(xy)]
        categories = [{"id": k, "name": f"c{k}"} for k in range(1, 6)]
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(
            {"images": images, "annotations": anns, "categories": categories}))
    (root / "done").touch()
    return root


def time_check(task_name: str, data: Path, *overrides: str) -> float:
    from moat.tasks.base import get_task
    from moat.train.config import load_config

    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        config = load_config(None, list(overrides), task=task_name, data=str(data),
                             model="tiny_moat_0", batch_size=8, epochs=1, img_size=64)
        reports = get_task(task_name)(config).check_data()
        best = min(best, time.perf_counter() - start)
        assert not any(r.errors for r in reports), [r.errors for r in reports]
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/moat-data-check")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--boxes", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    n, size = args.images, args.size
    from moat.cpu import cpu_info

    work = Path(args.work)
    seg = segmentation_set(work / f"seg-{n}-{size}", n, size)
    det = detection_set(work / f"det-{n}-{args.boxes}-{size}", n, args.boxes, size)
    n_val = max(1, n // 10)
    rows = [("segmentation", f"{n} + {n_val} palette masks, {size}x{size}",
             n + n_val, time_check("segmentation", seg)),
            ("detection", f"{n} + {n_val} {size}x{size} images, {args.boxes} boxes each",
             n + n_val, time_check("detection", det))]
    print("| task | data | check time | per image |")
    print("|---|---|---|---|")
    for task, what, n, seconds in rows:
        print(f"| {task} | {what} | {seconds:.2f} s | {1000 * seconds / n:.2f} ms |")
    print(f"\nCPU {cpu_info().describe()}, {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
