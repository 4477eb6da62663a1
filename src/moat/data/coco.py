"""COCO-format detection data: instances JSON + image folder, joint augmentation, and COCO
evaluation with pycocotools.

Dataset: `CocoDetection(image_dir, ann_file, transforms, train=...)` reads an instances JSON
through pycocotools. Each sample is `(image, target)`: a uint8 CHW tensor (float after the
transforms below) and a dict of

* `boxes` [N, 4] float32, XYXY in pixels (COCO's xywh converted),
* `labels` [N] int64, contiguous 1..K (0 is the background): `dataset.classes[label - 1]`
  is the name and `dataset.label_to_category[label]` the JSON's category id,
* `masks` [N, H, W] uint8, decoded by pycocotools from polygons, RLE or uncompressed RLE,
  and `has_mask` [N] bool (only with `masks=True`): an object without a segmentation (none,
  or an empty one: `has_segmentation`) has an empty mask and `has_mask` False, so that the
  mask head's loss leaves it out (its box and class still train),
* `iscrowd` [N] int64 and `area` [N] float32 (not in training targets),
* `image_id` int.

Training targets (`train=True`) leave out crowd regions (`iscrowd=1`: they are ignored in
training, as in torchvision's reference recipe; COCOeval still uses them at evaluation) and
boxes without area. Images with no (remaining) annotations stay in the dataset as negatives
unless `skip_empty=True`.

Transforms (torchvision.transforms.v2 on tv_tensors, so images, boxes and masks move
together): `train_transforms` = multi-scale resize (shorter side drawn from a range around
`min_size`, longer side at most `max_size`) or large-scale jitter ("lsj": resize by
0.1-2.0 then crop/pad to a square), horizontal flip, removal of degenerate boxes.
`eval_transforms` only converts to float: the detector's own transform resizes, and maps its
predictions back to the original image, where COCO's ground truth lives.

Evaluation: `detections_to_coco` turns model outputs into COCO result dicts (bbox xywh,
RLE masks, category ids), `coco_evaluate` runs pycocotools' own COCOeval on them.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from moat.errors import InvalidInputError
from moat.paths import regular_file
from moat.text import shortlist

__all__ = ["CocoDetection", "prepare_coco", "read_json", "BOX_FORMATS", "train_transforms", "eval_transforms", "collate_detection",
           "detections_to_coco", "coco_evaluate", "load_coco", "METRIC_NAMES", "has_segmentation",
           "mask_ground_truth"]

# COCOeval.stats order; mask metrics get the prefix "mask_".
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


BOX_FORMATS = ("xywh", "xyxy")
# category names taken for "no object": dropped (the detector has its own background)
BACKGROUND_NAMES = {"background", "__background__", "_background_", "bg", "__bg__"}


def read_json(path: str | os.PathLike) -> dict:
    """An annotation file as a dict; a clear error for a missing or broken file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"COCO annotation file not found: {str(path)!r}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"{str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise InvalidInputError(f"{str(path)!r} is not a COCO instances file: it needs \"images\", "
                                "\"annotations\" and \"categories\"")
    return data


def has_segmentation(annotation: Mapping[str, Any]) -> bool:
    """Whether a COCO annotation has a mask: RLE (a dict with "counts") or at least one
    polygon of three points; none, `[]`, `[[]]` or `{}` is a box-only object."""
    seg = annotation.get("segmentation")
    if isinstance(seg, Mapping):
        return bool(seg.get("counts"))
    return isinstance(seg, list) and any(isinstance(p, list) and len(p) >= 6 for p in seg)


def image_ids_for(paths: Sequence[str | os.PathLike], annotations: str | os.PathLike,
                  ) -> list[int]:
    """The id each image of `paths` has in the COCO file `annotations`, matched by file name
    (the longest `file_name` that the path ends with), so that results use the user's ids."""
    images = read_json(annotations)["images"]
    by_name: dict[str, list[dict]] = {}
    for image in images:
        by_name.setdefault(Path(image["file_name"]).name, []).append(image)
    ids, missing = [], []
    for path in paths:
        posix = Path(path).as_posix()
        found = [i for i in by_name.get(Path(path).name, [])
                 if posix == i["file_name"] or posix.endswith("/" + i["file_name"].lstrip("/"))]
        if not found:
            missing.append(str(path))
            continue
        ids.append(int(max(found, key=lambda i: len(i["file_name"]))["id"]))
    if missing:
        raise InvalidInputError(f"{len(missing)} image(s) are not in {str(annotations)!r} (matched "
                                f"by file_name): {shortlist(missing)}; predict the images that "
                                "file lists, or leave out --annotations (ids are then 1..N in "
                                "input order)")
    return ids


def prepare_coco(data: Mapping[str, Any], box_format: str = "xywh",
                 image_dir: str | os.PathLike | None = None) -> tuple[dict, list[str]]:
    """COCO annotations as labelling tools write them, made regular: (new dict, notes).

    * a category named "background" (or "__background__", "bg") is dropped with its
      annotations: the detector has its own background class;
    * `box_format="xyxy"`: boxes given as [x1, y1, x2, y2] become COCO's [x, y, w, h];
    * missing `id`, `iscrowd` and `area` of annotations are filled (area: the box's), and
      missing image `width`/`height` read from the files in `image_dir`.
    Category ids stay as they are (any ids, gaps allowed; `CocoDetection` maps them).
    """
    if box_format not in BOX_FORMATS:
        raise InvalidInputError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")
    data = dict(data)  # copies of what changes; segmentations are shared, not copied
    data["images"] = [dict(i) for i in data.get("images") or []]
    data["annotations"] = [dict(a) for a in data.get("annotations") or []]
    notes: list[str] = []
    categories = data.get("categories") or []
    background = {c["id"] for c in categories
                  if str(c.get("name", "")).strip().lower() in BACKGROUND_NAMES}
    if background:
        dropped = [a for a in data["annotations"] if a.get("category_id") in background]
        data["categories"] = [c for c in categories if c["id"] not in background]
        data["annotations"] = [a for a in data["annotations"]
                               if a.get("category_id") not in background]
        notes.append(f"category {sorted(background)} named background dropped (the detector "
                     f"has its own background), with its {len(dropped)} annotation(s)")
    used = {a["id"] for a in data["annotations"] if "id" in a}
    next_id = max(used, default=0) + 1
    for a in data["annotations"]:
        if box_format == "xyxy":
            x1, y1, x2, y2 = (float(v) for v in a["bbox"])
            a["bbox"] = [x1, y1, x2 - x1, y2 - y1]
        if "id" not in a:
            a["id"], next_id = next_id, next_id + 1
        a.setdefault("iscrowd", 0)
        if "area" not in a:
            a["area"] = float(max(a["bbox"][2], 0) * max(a["bbox"][3], 0))
    if box_format == "xyxy":
        notes.append("boxes read as [x1, y1, x2, y2] (box_format=xyxy)")
    if image_dir is not None:
        from PIL import Image

        filled = 0
        for info in data["images"]:
            if not info.get("width") or not info.get("height"):
                path = os.path.join(os.fspath(image_dir), info["file_name"])
                if os.path.isfile(path):
                    with Image.open(path) as img:
                        info["width"], info["height"] = img.size
                    filled += 1
        if filled:
            notes.append(f"width/height of {filled} image(s) read from the files")
    return data, notes


def load_coco(ann_file: str | os.PathLike | Mapping[str, Any], copy_dict: bool = True):
    """A pycocotools COCO object from a JSON path or an already-parsed dict (copied unless
    `copy_dict` is False: then the COCO object owns it), without its progress prints."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(ann_file, Mapping):
            coco = COCO()
            coco.dataset = copy.deepcopy(dict(ann_file)) if copy_dict else dict(ann_file)
            coco.createIndex()
        else:
            regular_file(ann_file, "COCO annotation file")
            coco = COCO(str(ann_file))
    return coco


class CocoDetection(Dataset):
    """Images and instance annotations of a COCO-format dataset (see the module docstring).

    Args:
        image_dir: folder the JSON's `file_name`s are relative to.
        ann_file: instances JSON path (or a parsed dict, or a pycocotools COCO object).
        transforms: callable `(image, target) -> (image, target)` on tv_tensors, e.g.
            `train_transforms(...)`; None returns the uint8 image.
        train: training targets: crowd regions and empty boxes left out.
        skip_empty: leave out images without (usable) annotations instead of keeping them
            as negatives.
        masks: decode instance masks (needed to train Mask R-CNN; evaluation reads the
            ground truth from the JSON and does not need them).
    """

    def __init__(self, image_dir: str | os.PathLike, ann_file, transforms: Callable | None = None,
                 *, train: bool = False, skip_empty: bool = False, masks: bool = True) -> None:
        self.image_dir = Path(image_dir)
        self.coco = ann_file if hasattr(ann_file, "imgToAnns") else load_coco(ann_file)
        self.transforms = transforms
        self.train = train
        self.masks = masks
        self.category_ids = sorted(self.coco.cats)
        self.classes = [self.coco.cats[c]["name"] for c in self.category_ids]
        self.category_to_label = {c: i + 1 for i, c in enumerate(self.category_ids)}
        self.label_to_category = {i + 1: c for i, c in enumerate(self.category_ids)}
        ids = sorted(self.coco.imgs)
        if skip_empty:
            ids = [i for i in ids if self._annotations(i)]
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def _annotations(self, image_id: int) -> list[dict]:
        anns = self.coco.imgToAnns.get(image_id, [])
        if self.train:
            anns = [a for a in anns if not a.get("iscrowd", 0)
                    and a["bbox"][2] > 0 and a["bbox"][3] > 0]
        return anns

    def load_image(self, image_id: int) -> Tensor:
        from torchvision.transforms.v2 import functional as TF

        from moat.data.images import load_rgb

        info = self.coco.imgs[image_id]
        # COCO annotates the stored pixels: EXIF orientation is not applied (as pycocotools,
        # torchvision and the COCO tools do).
        img = load_rgb(self.image_dir / info["file_name"], exif_transpose=False)
        h, w = info.get("height"), info.get("width")
        if (h, w) != (None, None) and (img.height, img.width) != (h, w):
            raise InvalidInputError(f"image {info['file_name']!r} is {img.width}x{img.height} but "
                                    f"the annotations say {w}x{h}; fix the JSON or the file")
        return TF.pil_to_tensor(img)

    def load_target(self, image_id: int, height: int, width: int) -> dict[str, Any]:
        from torchvision import tv_tensors

        anns = self._annotations(image_id)
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor([self.category_to_label[a["category_id"]] for a in anns],
                                   dtype=torch.int64),
            "image_id": int(image_id),
        }
        if not self.train:
            target["iscrowd"] = torch.tensor([int(a.get("iscrowd", 0)) for a in anns],
                                             dtype=torch.int64)
            target["area"] = torch.tensor([float(a.get("area", 0.0)) for a in anns],
                                          dtype=torch.float32)
        if self.masks:
            has_mask = [has_segmentation(a) for a in anns]
            masks = np.zeros((len(anns), height, width), dtype=np.uint8)
            for i, a in enumerate(anns):
                if has_mask[i]:
                    masks[i] = self.coco.annToMask(a)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(masks))
            target["has_mask"] = torch.tensor(has_mask, dtype=torch.bool)
        return target

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        from torchvision import tv_tensors

        image_id = self.ids[index]
        image = self.load_image(image_id)
        target = self.load_target(image_id, image.shape[-2], image.shape[-1])
        image = tv_tensors.Image(image)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        # Plain tensors from here on: the detectors do arithmetic on them.
        plain = {k: v.as_subclass(Tensor) if isinstance(v, Tensor) else v
                 for k, v in target.items()}
        return image.as_subclass(Tensor), plain


def _sanitized_items(inputs: Any) -> tuple[Tensor, ...]:
    """What SanitizeBoundingBoxes filters along with the boxes (masks are found by itself)."""
    target = inputs[1] if isinstance(inputs, (tuple, list)) else inputs
    return tuple(target[k] for k in ("labels", "iscrowd", "area", "has_mask") if k in target)


def train_transforms(min_size: int = 800, max_size: int = 1333, *,
                     scale_range: tuple[float, float] = (0.8, 1.25), jitter: str = "multiscale",
                     hflip: float = 0.5) -> Callable:
    """Joint image/box/mask augmentation for training.

    jitter="multiscale": the shorter side is drawn from 9 sizes spanning
    `min_size * scale_range`, the longer side capped at `max_size * scale_range[1]`.
    jitter="lsj" (large-scale jitter): resize to `min_size * U(scale_range)` of a
    `min_size` square (use e.g. scale_range=(0.1, 2.0)), then crop or pad to
    `min_size x min_size`. Then horizontal flip with probability `hflip`, and boxes smaller
    than one pixel (with their masks and labels) are removed.
    The output image is float in [0, 1]; the detector normalises it.
    """
    from torchvision.transforms import v2

    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise InvalidInputError(f"scale_range must be 0 < low <= high, got {scale_range}")
    if jitter == "multiscale":
        sizes = sorted({max(1, round(min_size * s)) for s in np.linspace(lo, hi, 9)})
        ops = [v2.RandomShortestSize(sizes, max_size=round(max_size * hi), antialias=True)]
    elif jitter == "lsj":
        ops = [v2.ScaleJitter((min_size, min_size), scale_range=(lo, hi), antialias=True),
               v2.RandomCrop((min_size, min_size), pad_if_needed=True, fill=0)]
    else:
        raise InvalidInputError(f"jitter must be 'multiscale' or 'lsj', got {jitter!r}")
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    ops += [v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=1.0, labels_getter=_sanitized_items),
            v2.ToDtype(torch.float32, scale=True)]
    return v2.Compose(ops)


def eval_transforms() -> Callable:
    """Evaluation: the image as float in [0, 1] at its own size (the detector resizes)."""
    from torchvision.transforms import v2

    return v2.ToDtype(torch.float32, scale=True)


def collate_detection(batch: Sequence[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """Detection batches are lists: images differ in size and in their number of objects."""
    images, targets = zip(*batch) if batch else ((), ())
    return list(images), list(targets)


def _encode_mask(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def detections_to_coco(output: Mapping[str, Tensor], image_id: int,
                       label_to_category: Mapping[int, int] | None = None,
                       mask_threshold: float = 0.5) -> list[dict]:
    """One image's detector output (boxes XYXY, scores, labels, optional masks [N,1,H,W]
    probabilities) as COCO result dicts: `bbox` [x, y, w, h], `score`, `category_id` and,
    with masks, `segmentation` (compressed RLE of mask > mask_threshold)."""
    boxes = output["boxes"].detach().float().cpu()
    scores = output["scores"].detach().float().cpu().tolist()
    labels = output["labels"].detach().cpu().tolist()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    masks = output.get("masks")
    if masks is not None:
        masks = (masks.detach()[:, 0] > mask_threshold).cpu().numpy()
    results = []
    for i, (box, score, label) in enumerate(zip(xywh, scores, labels)):
        category = label_to_category[label] if label_to_category is not None else int(label)
        r = {"image_id": int(image_id), "category_id": int(category),
             "bbox": [round(v, 3) for v in box], "score": round(float(score), 5)}
        if masks is not None:
            r["segmentation"] = _encode_mask(masks[i])
        results.append(r)
    return results


def _metric_names(iou_type: str) -> list[str]:
    prefix = "" if iou_type == "bbox" else "mask_" if iou_type == "segm" else f"{iou_type}_"
    return [prefix + m for m in METRIC_NAMES]


def coco_evaluate(coco_gt, results: Iterable[Mapping[str, Any]],
                  iou_types: Sequence[str] = ("bbox",),
                  image_ids: Iterable[int] | None = None,
                  summary: list[str] | None = None) -> dict[str, float]:
    """COCO AP/AR of `results` (COCO result dicts) against `coco_gt` with pycocotools' COCOeval.

    Each iou_type ("bbox", "segm") is evaluated on its own copy of the results, holding only
    its field (so a mask's area, not its box's, decides small/medium/large for "segm").
    `image_ids` restricts the evaluation to those images (default: every image of coco_gt:
    images without detections count as missed). Keys: AP, AP50, AP75, APs, APm, APl, AR1,
    AR10, AR100, ARs, ARm, ARl for boxes, the same prefixed "mask_" for masks; -1 is
    pycocotools' value where an area range has no ground truth; and per category
    "AP/<name>" ("mask_AP/<name>", see `per_category_ap`). COCOeval's printed table is
    appended to `summary` when given. Mask AP is over the objects that have a mask
    (`mask_ground_truth`).
    """
    from pycocotools.cocoeval import COCOeval

    coco_gt = coco_gt if hasattr(coco_gt, "imgToAnns") else load_coco(coco_gt)
    results = list(results)
    image_ids = sorted(coco_gt.getImgIds() if image_ids is None else set(image_ids))
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        field = {"bbox": "bbox", "segm": "segmentation"}.get(iou_type)
        if field is None:
            raise InvalidInputError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
        typed = [{k: copy.deepcopy(r[k]) for k in ("image_id", "category_id", "score", field)}
                 for r in results if field in r]
        names = _metric_names(iou_type)
        if not typed:  # loadRes cannot take an empty list: nothing detected scores 0
            metrics.update(dict.fromkeys(names, 0.0))
            metrics.update({f"{names[0]}/{c.get('name', i)}": 0.0
                            for i, c in coco_gt.cats.items() if coco_gt.getAnnIds(catIds=[i])})
            continue
        truth = mask_ground_truth(coco_gt) if iou_type == "segm" else coco_gt
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = truth.loadRes(typed)
            evaluator = COCOeval(truth, coco_dt, iou_type)
            evaluator.params.imgIds = image_ids
            evaluator.evaluate()
            evaluator.accumulate()
        with contextlib.redirect_stdout(io.StringIO()) as table:
            evaluator.summarize()
        if summary is not None:
            summary.append(f"[{iou_type}]\n{table.getvalue().rstrip()}")
        metrics.update({n: float(v) for n, v in zip(names, evaluator.stats)})
        metrics.update(per_category_ap(evaluator, names[0]))
    return metrics


def mask_ground_truth(coco_gt):
    """The ground truth of mask AP ("segm"): objects without a mask (`has_segmentation`)
    become crowd regions covering their box, so that a detection on one is neither a hit
    nor a false positive (pycocotools would stop on them); `coco_gt` itself when every
    object has a mask."""
    anns = coco_gt.dataset.get("annotations", [])
    if all(has_segmentation(a) for a in anns):
        return coco_gt

    def box_region(a: dict) -> dict:
        x, y, w, h = (float(v) for v in a["bbox"])
        return {**a, "iscrowd": 1, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}

    data = {**coco_gt.dataset, "annotations": [a if has_segmentation(a) else box_region(a)
                                               for a in anns]}
    return load_coco(data, copy_dict=False)


def per_category_ap(evaluator: Any, prefix: str = "AP") -> dict[str, float]:
    """`<prefix>/<category name>`: each category's AP (IoU 0.5:0.95, all areas, 100
    detections) from an accumulated COCOeval; categories without ground truth in the
    evaluated images are left out (their AP is undefined, -1 in pycocotools)."""
    precision = evaluator.eval["precision"]  # [IoU, recall, category, area, max dets]
    cats = evaluator.cocoGt.cats
    out: dict[str, float] = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        if p.size:
            out[f"{prefix}/{cats[cat_id].get('name', cat_id)}"] = float(np.mean(p))
    return out
