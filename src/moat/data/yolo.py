"""YOLO text labels (the format Ultralytics, Roboflow, CVAT and LabelImg export) read as a
COCO dataset, so that they train, evaluate and predict exactly as COCO JSON does.

Layouts (`find_yolo_split`): `images/<split>/` + `labels/<split>/` (Ultralytics),
`<split>/images/` + `<split>/labels/` (Roboflow), or `images/` + `labels/` (one split).
Each image `a.jpg` has `labels/.../a.txt` with one object per line: `class cx cy w h`,
normalised to 0..1 (a box), or `class x1 y1 x2 y2 ...` (a polygon, YOLO segmentation).
An image without a label file, or with an empty one, is a negative (no object).
Class names: `classes.txt` (in the root or the labels folder) or the `names` of
`data.yaml` / `dataset.yaml`; class k is COCO category id k, so predictions carry the
YOLO class ids.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from moat.data.checks import DataError
from moat.data.images import IMAGE_SUFFIXES
from moat.text import shortlist

SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation")}


def find_yolo_split(root: str | os.PathLike, split: str) -> tuple[Path, Path] | None:
    """(images folder, labels folder) of `split` ("train" or "val") under `root`, or None.
    A single `images/` + `labels/` pair (no split folders) serves as every split."""
    root = Path(root)
    for name in SPLIT_NAMES.get(split, (split,)):
        for images, labels in ((root / "images" / name, root / "labels" / name),
                               (root / name / "images", root / name / "labels")):
            if images.is_dir() and labels.is_dir():
                return images, labels
    images, labels = root / "images", root / "labels"
    if images.is_dir() and labels.is_dir() and not any(
            (images / n).is_dir() for names in SPLIT_NAMES.values() for n in names):
        return images, labels
    return None


def read_yolo_names(root: str | os.PathLike, labels: str | os.PathLike) -> list[str]:
    """Class names from classes.txt (root or labels folder) or data.yaml / dataset.yaml."""
    for folder in (Path(root), Path(labels)):
        if (folder / "classes.txt").is_file():
            names = [line.strip() for line in (folder / "classes.txt").read_text().splitlines()]
            return [n for n in names if n]
    for name in ("data.yaml", "dataset.yaml"):
        path = Path(root) / name
        if path.is_file():
            import yaml  # pyyaml: in moat[full]

            names = (yaml.safe_load(path.read_text()) or {}).get("names")
            if isinstance(names, dict):
                names = [names[k] for k in sorted(names)]
            if names:
                return [str(n) for n in names]
    raise DataError(f"no class names for the YOLO labels in {str(root)!r}: add classes.txt "
                    "(one name per line, line k = class id k) or data.yaml with `names:`")


def yolo_to_coco(images_dir: str | os.PathLike, labels_dir: str | os.PathLike,
                 names: list[str]) -> dict:
    """A COCO instances dict of a YOLO split (file names relative to `images_dir`).

    Raises DataError naming the files for class ids outside `names`, coordinates outside
    0..1 (pixel coordinates where normalised ones are expected) and malformed lines.
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    files = sorted(p for p in images_dir.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images in {str(images_dir)!r}")
    images, annotations = [], []
    bad_class, not_normalised, malformed = [], [], []
    for image_id, path in enumerate(files, start=1):
        with Image.open(path) as img:
            width, height = img.size
        relative = path.relative_to(images_dir)
        images.append({"id": image_id, "file_name": relative.as_posix(), "width": width,
                       "height": height})
        label = (labels_dir / relative).with_suffix(".txt")
        if not label.is_file():
            continue
        for line_no, line in enumerate(label.read_text().splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            where = f"{label.name}:{line_no}"
            try:
                cls, values = int(float(parts[0])), [float(v) for v in parts[1:]]
            except ValueError:
                malformed.append(where)
                continue
            if len(values) != 4 and (len(values) < 6 or len(values) % 2):
                malformed.append(where)
                continue
            if not 0 <= cls < len(names):
                bad_class.append(f"{where} (class {cls})")
                continue
            if any(v < -0.01 or v > 1.01 for v in values):
                not_normalised.append(where)
                continue
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": cls,
                   "iscrowd": 0}
            if len(values) == 4:
                cx, cy, w, h = values
                box = [(cx - w / 2) * width, (cy - h / 2) * height, w * width, h * height]
            else:
                xs = [v * width for v in values[0::2]]
                ys = [v * height for v in values[1::2]]
                box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
                ann["segmentation"] = [[round(c, 2) for xy in zip(xs, ys) for c in xy]]
            ann["bbox"] = [round(v, 3) for v in box]
            ann["area"] = float(box[2] * box[3])
            annotations.append(ann)
    problems = []
    if bad_class:
        problems.append(f"class ids outside 0..{len(names) - 1} ({len(names)} names in "
                        f"classes.txt) at {shortlist(bad_class)}: add the missing names to "
                        "classes.txt or fix the labels")
    if not_normalised:
        problems.append(f"coordinates outside 0..1 at {shortlist(not_normalised)}: YOLO labels "
                        "are normalised by the image size (x / width, y / height), these look "
                        "like pixels")
    if malformed:
        problems.append(f"malformed lines at {shortlist(malformed)}: expected `class cx cy w h` "
                        "or `class x1 y1 x2 y2 ...`")
    if problems:
        raise DataError(f"YOLO labels in {str(labels_dir)!r}: " + "; ".join(problems))
    return {"images": images, "annotations": annotations,
            "categories": [{"id": k, "name": n} for k, n in enumerate(names)]}


