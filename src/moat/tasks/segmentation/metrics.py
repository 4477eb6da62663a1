"""Segmentation metrics from the whole set's confusion matrix (`moat.tasks.confusion`, rows =
ground truth, columns = prediction; pixels labelled `ignore_index` are skipped, counts summed
across processes):

* IoU_c = TP / (TP + FP + FN) per class c;
* **a class absent from both the ground truth and the predictions of the whole set has no
  IoU (NaN): it is excluded from mIoU**, not counted as 0 or 1. A class that is predicted
  but never present has IoU 0 and counts;
* mIoU = mean of the defined IoUs; pixel accuracy = correct / labelled pixels; mAcc = mean
  over present classes of TP / (TP + FN).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def metrics_from_confusion(cm: Tensor, class_names: Sequence[str] | None = None,
                           ) -> dict[str, float]:
    """mIoU, pixel accuracy, mAcc and per-class IoU from a [K, K] confusion matrix.

    Classes absent from both ground truth and predictions (TP + FP + FN = 0) are excluded from
    the means and from the per-class entries ("IoU/<name>"), so every value is a finite float;
    with no labelled pixel at all, every metric is 0.
    """
    cm = cm.double()
    tp = cm.diag()
    gt, predicted = cm.sum(1), cm.sum(0)
    union = gt + predicted - tp
    present = union > 0
    iou = tp / union.clamp(min=1)
    labelled = gt > 0
    out = {
        "mIoU": float(iou[present].mean()) if present.any() else 0.0,
        "pixel_acc": float(tp.sum() / cm.sum()) if cm.sum() > 0 else 0.0,
        "mAcc": float((tp[labelled] / gt[labelled]).mean()) if labelled.any() else 0.0,
    }
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(tp))]
    for index in torch.nonzero(present).flatten().tolist():
        out[f"IoU/{names[index]}"] = float(iou[index])
    return out
