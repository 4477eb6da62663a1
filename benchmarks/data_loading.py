"""Images per second delivered to the training step (decoded, augmented, collated into a
batch) from WebDataset shards against the same images in class folders, at 1 and 2 loader
workers. A benchmark, not a test: it prints a table with the CPU.

    python benchmarks/data_loading.py [--work DIR] [--images 2000] [--size 256]
                                      [--img-size 160] [--batch 64] [--shard-size 500]

The images are JPEG crops (`--size` px, quality 90) of real photos (skimage.data: astronaut,
coffee, chelsea, rocket; one class each), written once as class folders, then sharded with
`moat shard` (the documented command). Both sources go through the loader `moat train`
builds (moat.train.loaders.train_loader: the training sampler, per-sample seeded
augmentation, the classification transform at `--img-size`, SkipBadCollate); each cell is one
full epoch after a warm-up epoch, so the files are in the page cache for both.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from moat.bench.report import environment
from moat.data.classification import SkipBadCollate
from moat.data.sources import classification_datasets
from moat.data.transforms import train_transform
from moat.train.loaders import train_loader


def write_folders(root: Path, images: int, size: int) -> None:
    from skimage import data

    photos = {"astronaut": data.astronaut(), "coffee": data.coffee(), "cat": data.chelsea(),
              "rocket": data.rocket()}
    rng = np.random.default_rng(0)
    for k in range(images):
        name, photo = list(photos.items())[k % len(photos)]
        side = int(rng.integers(size // 2, min(photo.shape[:2])))
        y = rng.integers(0, photo.shape[0] - side + 1)
        x = rng.integers(0, photo.shape[1] - side + 1)
        crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size))
        folder = root / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"{k:06d}.jpg", quality=90)


def images_per_second(data: Path, workers: int, img_size: int, batch: int) -> float:
    train, _ = classification_datasets(data, train_transform=train_transform(img_size))
    loader = train_loader(train, batch, collate_fn=SkipBadCollate(), workers=workers, seed=0,
                          pin_memory=False)
    loader.sampler.set_epoch(0)
    for _ in loader:  # warm-up: workers started, files cached, shards indexed
        pass
    loader.sampler.set_epoch(1)
    start, count = time.perf_counter(), 0
    for batch_ in loader:
        count += len(batch_.targets)
    return count / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/data-loading-bench")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=256, help="side of the stored JPEGs")
    p.add_argument("--img-size", type=int, default=160, help="training crop")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=500)
    args = p.parse_args()
    work = Path(args.work)
    folders, shards = work / "folders", work / "shards"
    if not (folders / "train").is_dir():
        write_folders(folders, args.images, args.size)
    if not (shards / "_info.json").is_file():
        subprocess.run([sys.executable, "-m", "moat.cli", "shard", str(folders), str(shards),
                        "--shard-size", str(args.shard_size)], check=True)
    env = environment()
    print(f"CPU: {env['cpu_description']} ({env['cpu_count']} cores), torch {env['torch']}, load "
          f"{env['load_average']}; {args.images} JPEGs of {args.size} px, crop {args.img_size}, "
          f"batch {args.batch}, shards of {args.shard_size}")
    print(f"{'workers':>8} {'folders img/s':>14} {'shards img/s':>13} {'shards/folders':>15}")
    for workers in (1, 2):
        rate_f = images_per_second(folders, workers, args.img_size, args.batch)
        rate_s = images_per_second(shards, workers, args.img_size, args.batch)
        print(f"{workers:>8} {rate_f:>14.1f} {rate_s:>13.1f} {rate_s / rate_f:>15.2f}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
