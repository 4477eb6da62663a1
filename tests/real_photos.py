"""A small detection dataset of real photographs, labelled as a user would: scikit-image's
`coins` photograph (303x384, 24 coins on a dark tray; installed with pip, nothing downloaded),
each coin's box from the classical segmentation of skimage's coins tutorial (Sobel edges,
watershed from dark and bright markers, holes filled). Tiles of 96 px are cut from it:
training tiles from the top three rows of coins, validation tiles from the bottom row (no
coin is in both). A coin that a tile cuts to less than 60% of its box is a crowd region
(ignored in training and evaluation). Written as COCO JSON with category id 7 (and a
"background" category id 0, which moat drops with a note), plus the same labels as YOLO text
files. Used by tests/test_user_data.py and benchmarks/real_photo_dense.py."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np

TILE = 96
TRAIN_ROWS = (0, 125)      # tile tops: tiles end above the bottom row of coins (y >= 233)
VAL_TOP = 303 - TILE + 16  # the bottom row; tiles reach past the photo and are cut to it
CATEGORY = 7               # the user's id of "coin"
VISIBLE = 0.6              # less of a coin's box inside a tile: a crowd (ignored) region


def coin_boxes() -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """The coins photo and each coin's box (x0, y0, x1, y1), from skimage's coins tutorial
    segmentation: Sobel edges, watershed from markers at grey < 30 and > 150, holes filled."""
    from scipy import ndimage
    from skimage import data, filters, measure, segmentation

    image = data.coins()
    markers = np.zeros(image.shape, int)
    markers[image < 30], markers[image > 150] = 1, 2
    coins = segmentation.watershed(filters.sobel(filters.gaussian(image, 1)), markers) == 2
    coins = ndimage.binary_fill_holes(coins)
    boxes = [(p.bbox[1], p.bbox[0], p.bbox[3], p.bbox[2])
             for p in measure.regionprops(measure.label(coins)) if p.area > 400]
    return image, boxes


def _tile(image, boxes, x0: int, y0: int, image_id: int, name: str, anns: list) -> dict:
    height, width = min(TILE, image.shape[0] - y0), min(TILE, image.shape[1] - x0)
    for bx0, by0, bx1, by1 in boxes:
        cx0, cy0 = max(bx0, x0) - x0, max(by0, y0) - y0
        cx1, cy1 = min(bx1, x0 + width) - x0, min(by1, y0 + height) - y0
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        inside = (cx1 - cx0) * (cy1 - cy0) / ((bx1 - bx0) * (by1 - by0))
        anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": CATEGORY,
                     "bbox": [cx0, cy0, cx1 - cx0, cy1 - cy0], "area": (cx1 - cx0) * (cy1 - cy0),
                     "iscrowd": int(inside < VISIBLE)})
    return {"id": image_id, "file_name": name, "width": width, "height": height}


def write_coins(root: Path, train_tiles: int = 32, seed: int = 0) -> Path:
    """root/annotations/instances_{train,val}.json + root/{train,val}/*.png (COCO) and
    root/yolo/{images,labels}/{train,val} + classes.txt (the same labels as YOLO)."""
    from PIL import Image

    image, boxes = coin_boxes()
    rng = np.random.default_rng(seed)
    tops = {"train": [(int(rng.integers(0, image.shape[1] - TILE + 1)),
                       int(rng.integers(*TRAIN_ROWS))) for _ in range(train_tiles)],
            "val": [(x, VAL_TOP) for x in range(0, image.shape[1] - TILE + 1, 48)]}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, corners in tops.items():
        (root / split).mkdir(exist_ok=True)
        images, anns = [], []
        for i, (x0, y0) in enumerate(corners, start=1):
            name = f"coins_{split}_{i:03d}.png"
            info = _tile(image, boxes, x0, y0, i, name, anns)
            Image.fromarray(image[y0:y0 + info["height"], x0:x0 + info["width"]]).save(
                root / split / name)
            images.append(info)
        categories = [{"id": 0, "name": "background"}, {"id": CATEGORY, "name": "coin"}]
        coco = {"images": images, "annotations": anns, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
        _write_yolo(root, split, coco)
    return root


def _write_yolo(root: Path, split: str, coco: dict) -> None:
    """The split's non-crowd boxes as YOLO labels (YOLO has no crowd regions)."""
    images, labels = root / "yolo" / "images" / split, root / "yolo" / "labels" / split
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    (root / "yolo" / "classes.txt").write_text("coin\n")
    for info in coco["images"]:
        link = images / info["file_name"]
        if not link.exists():
            link.symlink_to(os.path.relpath(root / split / info["file_name"], images))
        w, h = info["width"], info["height"]
        lines = [f"0 {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}"
                 for a in coco["annotations"] if a["image_id"] == info["id"] and not a["iscrowd"]
                 for x, y, bw, bh in [a["bbox"]]]
        (labels / info["file_name"].replace(".png", ".txt")).write_text("\n".join(lines))


def shuffled_baseline(root: Path, seed: int = 0) -> float:
    """AP50 of the true validation boxes given to the wrong tiles (score 1): the best a run
    reaches that learnt the boxes' statistics but not where the coins are."""
    from moat.data.coco import coco_evaluate, load_coco

    truth = json.loads((root / "annotations" / "instances_val.json").read_text())
    coco = load_coco(truth)
    ids = [i["id"] for i in truth["images"]]
    moved = dict(zip(ids, random.Random(seed).sample(ids, len(ids))))
    results = [{"image_id": moved[a["image_id"]], "category_id": a["category_id"],
                "bbox": a["bbox"], "score": 1.0} for a in truth["annotations"] if not a["iscrowd"]]
    return coco_evaluate(coco, results)["AP50"]
