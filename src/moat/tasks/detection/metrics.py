"""COCO evaluation across processes: every process's detections gathered on rank 0, scored
once there with pycocotools' COCOeval (`moat.data.coco.coco_evaluate`), the metrics sent
back to every process. The main metric is **AP** (box AP averaged over IoU 0.5:0.95),
COCO's primary metric and the number the paper reports (59.2 AP^box): it rewards
localisation quality, which is what a cascade is for; AP50 is reported too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moat.data.coco import coco_evaluate
from moat.errors import InvalidInputError
from moat.train.distributed import all_gather_objects, broadcast_object, world


def gather_detections(per_image: Mapping[int, list[dict]]) -> dict[int, list[dict]] | None:
    """Merge every process's {image_id: COCO result dicts} on rank 0 (None elsewhere).

    Without an initialised process group it returns the input. An image seen by several
    processes (samplers pad the last batch with repeats) keeps the first process's
    detections, so nothing is counted twice.
    """
    parts = all_gather_objects(dict(per_image))
    if world()[1] != 0:
        return None
    merged: dict[int, list[dict]] = {}
    for part in parts:
        for image_id, dets in part.items():
            merged.setdefault(image_id, dets)
    return merged


def coco_metrics(per_image: Mapping[int, list[dict]], coco: Any, with_masks: bool,
                 ) -> dict[str, float]:
    """Box (and mask) AP of every process's detections, the same dict on every process."""
    merged = gather_detections(per_image)
    metrics = None
    if merged is not None:
        results = [r for dets in merged.values() for r in dets]
        iou_types = ("bbox", "segm") if with_masks or any(
            "segmentation" in r for r in results) else ("bbox",)
        metrics = coco_evaluate(coco, results, iou_types, image_ids=merged.keys())
    return broadcast_object(metrics)


def coco_dataset(dataset: Any):
    """The CocoDetection dataset (with its pycocotools `coco`) inside possible wrappers."""
    while not hasattr(dataset, "coco") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    if getattr(dataset, "coco", None) is None:
        raise InvalidInputError("detection evaluation needs a moat.data.coco.CocoDetection dataset")
    return dataset
