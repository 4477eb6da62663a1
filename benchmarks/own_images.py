"""Train on real image sets that moat does not ship, the way a user would, and print a table:
the documented command with default settings, a hand-tuned run of the same model and epochs,
and logistic regression on 16x16 raw pixels. A benchmark, not a test.

    python benchmarks/own_images.py [--work DIR] [--sets faces textures photos digits]
                                    [--runs defaults tuned] [--set KEY=VALUE ...]

The image sets come from scikit-learn and scikit-image (installed with pip, nothing is
downloaded at run time), written once as class folders with a seeded split, as a user's data:

    faces     2 classes, grey,   25x25 px: skimage.data.lfw_subset (faces / not faces)
    textures  3 classes, grey,   80x80 px: patches of skimage's brick, grass, gravel photos
              (training patches from the top of each photo, validation from the bottom)
    photos    3 classes, colour, 80x80 px: patches of china.jpg, flower.jpg (scikit-learn)
              and skimage's coffee, split the same way
    digits   10 classes, grey,     8x8 px: sklearn.datasets.load_digits (scans), 80/20

Each run is `python -m moat.cli train --data DIR --model tiny_moat_0 --img-size 64 --epochs E
--batch-size B --output RUN` (+ the hand-tuned flags for "tuned"); a run that finished before
is read back, not repeated. The final validation top-1 comes from the run's last evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from moat.cpu import cpu_info

# name -> (epochs, batch size) of the documented command
SCHEDULES = {"faces": (30, 32), "textures": (25, 32), "photos": (25, 32), "digits": (20, 64)}

# The hand-tuned run of issue #13: today's ImageNet recipe with these settings changed.
TUNED = ["--recipe", "imagenet", "--lr", "1e-3", "--set", "mixup=0", "--set", "cutmix=0",
         "--set", "randaugment=null", "--set", "ema=false", "--set", "bn_momentum=0.1",
         "--set", "label_smoothing=0", "--set", "scale=[0.5,1.0]", "--set", "warmup_epochs=1"]


# --- the image sets ------------------------------------------------------------------------------

def _patches(image: np.ndarray, n: int, size: int, rows: tuple[int, int],
             rng: np.random.Generator) -> list[np.ndarray]:
    top = rng.integers(rows[0], rows[1] - size + 1, n)
    left = rng.integers(0, image.shape[1] - size + 1, n)
    return [image[t:t + size, s:s + size] for t, s in zip(top, left)]


def _patch_set(images: dict[str, np.ndarray], n_train: int, n_val: int,
               rng: np.random.Generator) -> dict[str, dict[str, list[np.ndarray]]]:
    out: dict[str, dict[str, list[np.ndarray]]] = {"train": {}, "val": {}}
    for name, image in images.items():
        cut = int(image.shape[0] * 0.7)  # no patch crosses from training into validation rows
        out["train"][name] = _patches(image, n_train, 80, (0, cut), rng)
        out["val"][name] = _patches(image, n_val, 80, (cut, image.shape[0]), rng)
    return out


def _split(x: np.ndarray, y: np.ndarray, names: list[str], val_fraction: float,
           rng: np.random.Generator) -> dict[str, dict[str, list[np.ndarray]]]:
    order = rng.permutation(len(x))
    n_val = int(round(len(x) * val_fraction))
    out: dict[str, dict[str, list[np.ndarray]]] = {"train": {}, "val": {}}
    for split, idx in (("val", order[:n_val]), ("train", order[n_val:])):
        for i in idx:
            out[split].setdefault(names[y[i]], []).append(x[i])
    return out


def build_set(name: str) -> dict[str, dict[str, list[np.ndarray]]]:
    """{split: {class: [uint8 image]}} of one set, seeded."""
    import skimage.data
    from sklearn import datasets

    rng = np.random.default_rng(0)
    if name == "faces":
        x = (skimage.data.lfw_subset() * 255).round().astype(np.uint8)
        y = np.array([0] * 100 + [1] * 100)  # the first 100 are faces
        return _split(x, y, ["face", "not_face"], 0.25, rng)
    if name == "textures":
        images = {n: getattr(skimage.data, n)() for n in ("brick", "grass", "gravel")}
        return _patch_set(images, 100, 30, rng)
    if name == "photos":
        china, flower = datasets.load_sample_images().images
        images = {"china": china, "flower": flower, "coffee": skimage.data.coffee()}
        return _patch_set(images, 80, 30, rng)
    if name == "digits":
        d = datasets.load_digits()
        x = (d.images * (255 / 16)).round().astype(np.uint8)
        return _split(x, d.target, [f"digit_{k}" for k in range(10)], 0.2, rng)
    raise ValueError(f"unknown set {name!r}; choose from {list(SCHEDULES)}")


def write_set(name: str, root: Path) -> Path:
    """Class folders root/NAME/{train,val}/<class>/*.png (written once)."""
    from PIL import Image

    folder = root / name
    if (folder / "done").exists():
        return folder
    for split, classes in build_set(name).items():
        for cls, images in classes.items():
            (folder / split / cls).mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                Image.fromarray(image).save(folder / split / cls / f"{i:04d}.png")
    (folder / "done").write_text("")
    return folder


# --- the three contenders -------------------------------------------------------------------------

def logistic_regression(folder: Path) -> float:
    """Top-1 (%) of logistic regression on 16x16 raw pixels (grey or RGB), standardised."""
    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def load(split: str):
        xs, ys = [], []
        for k, cls in enumerate(sorted(p.name for p in (folder / "train").iterdir())):
            for path in sorted((folder / split / cls).iterdir()):
                xs.append(np.asarray(Image.open(path).resize((16, 16), Image.BILINEAR),
                                     np.float32).ravel())
                ys.append(k)
        return np.stack(xs), np.array(ys)

    (xt, yt), (xv, yv) = load("train"), load("val")
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, C=1.0))
    return float((clf.fit(xt, yt).predict(xv) == yv).mean() * 100)


def train_run(folder: Path, run_dir: Path, extra: list[str], epochs: int,
              batch: int) -> tuple[float, float]:
    """(final validation top-1, seconds) of one `moat train` run; reused when it finished."""
    result = run_dir / "result.json"
    if not result.exists():
        cmd = [sys.executable, "-m", "moat.cli", "train", "--data", str(folder), "--model",
               "tiny_moat_0", "--img-size", "64", "--epochs", str(epochs), "--batch-size",
               str(batch), "--output", str(run_dir), "--no-progress", *extra]
        if (run_dir / "checkpoints").is_dir():
            cmd.append("--resume")
        print("$", " ".join(cmd), flush=True)
        t0 = time.time()
        subprocess.run(cmd, check=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()
                 if '"eval"' in line]
        last = evals[-1]  # the run reports the better of the raw and the EMA weights
        result.write_text(json.dumps({"top1": max(last["top-1"], last.get("ema/top-1", 0.0)),
                                      "seconds": time.time() - t0}))
    values = json.loads(result.read_text())
    return values["top1"], values["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/moat-own-images", help="data and runs folder")
    parser.add_argument("--sets", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    parser.add_argument("--runs", nargs="+", default=["defaults", "tuned"],
                        choices=["defaults", "tuned"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra setting for the defaults run (its folder gets a suffix)")
    args = parser.parse_args()

    work = Path(args.work)
    suffix = "".join(f"_{s}" for s in args.set).replace("/", "-")
    rows = []
    for name in args.sets:
        folder = write_set(name, work / "data")
        epochs, batch = SCHEDULES[name]
        n_train = sum(1 for _ in (folder / "train").glob("*/*.png"))
        n_classes = len(list((folder / "train").iterdir()))
        row = {"set": name, "classes": n_classes, "train": n_train, "epochs": epochs,
               "batch": batch, "logreg": logistic_regression(folder)}
        for run in args.runs:
            extra = TUNED if run == "tuned" else [a for s in args.set for a in ("--set", s)]
            run_dir = work / "runs" / f"{name}_{run}{suffix if run == 'defaults' else ''}"
            row[run], row[f"{run}_s"] = train_run(folder, run_dir, extra, epochs, batch)
        rows.append(row)

    print(f"\nmoat {sys.argv[1:]}, CPU {cpu_info().describe()}, {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.1f}")
    header = "| set | classes | train images | epochs x batch | logistic regression 16x16 |" + \
        "".join(f" {r} top-1 (time) |" for r in args.runs)
    print(header)
    print("|" + " --- |" * (header.count("|") - 1))
    for row in rows:
        print(f"| {row['set']} | {row['classes']} | {row['train']} | {row['epochs']} x "
              f"{row['batch']} | {row['logreg']:.1f}% |" +
              "".join(f" {row[r]:.1f}% ({row[r + '_s']:.0f} s) |" for r in args.runs))


if __name__ == "__main__":
    main()
