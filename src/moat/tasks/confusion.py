"""The confusion matrix and its report files, shared by classification and segmentation.

Rows are the ground truth, columns the prediction: a classifier counts one entry per image
(its top-1 class), a segmenter one per labelled pixel. The matrix is accumulated over the
whole evaluation set and summed over processes, so every metric derived from it is exact,
not a mean of per-batch values. The report is `metrics.json`, `per_class.csv` (columns the
task chooses) and `confusion.csv`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moat.data.masks import IGNORE_INDEX
from moat.errors import InvalidInputError
from moat.atomic import atomic_output, atomic_write_text
from moat.train.distributed import all_reduce_sum


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int,
                     ignore_index: int | None = IGNORE_INDEX) -> Tensor:
    """[K, K] int64 counts, rows = ground truth, columns = prediction; ignored entries skipped.

    Raises ValueError for a target or prediction outside 0..K-1 (other than the ignore
    index): that is a wrong `num_classes` or label convention, not something to skip.
    """
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if pred.shape != target.shape:
        raise InvalidInputError(f"prediction and target sizes differ: {pred.numel()} vs {target.numel()}")
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    if target.numel():
        low, high = int(target.min()), int(target.max())
        if low < 0 or high >= num_classes:
            raise InvalidInputError(
                f"label {high if high >= num_classes else low} is outside 0..{num_classes - 1} "
                f"(ignore index {ignore_index}): check num_classes and the dataset's label "
                "convention (ADE20K masks need reduce_zero_label)")
        if int(pred.min()) < 0 or int(pred.max()) >= num_classes:
            raise InvalidInputError(f"prediction outside 0..{num_classes - 1}")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


class ConfusionMatrix:
    """Accumulates a confusion matrix over a whole set (see `confusion_matrix`)."""

    def __init__(self, num_classes: int, ignore_index: int | None = IGNORE_INDEX,
                 device: torch.device | str | None = None) -> None:
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: Tensor, target: Tensor) -> None:
        self.matrix += confusion_matrix(pred, target, self.num_classes,
                                        self.ignore_index).to(self.matrix.device)

    def all_reduce(self, device: torch.device | str | None = None) -> Tensor:
        """Sum over processes (no-op unless torch.distributed is initialized) on `device`
        (the backend's: CUDA for NCCL; default the matrix's); return the sum on the CPU."""
        return all_reduce_sum(self.matrix.to(device or self.matrix.device)).cpu()


def class_recall(confusion: Tensor) -> list[float]:
    """Recall of each class (correct / its ground-truth count) as a fraction; NaN for a
    class with no ground truth."""
    totals = confusion.sum(1).double()
    acc = confusion.diag().double() / totals
    return [float("nan") if t == 0 else float(a) for a, t in zip(acc, totals)]


def csv_cell(name: str) -> str:
    """A class name as one CSV cell (quoted, inner quotes doubled, when it holds a comma,
    quote or newline)."""
    return '"' + name.replace('"', '""') + '"' if any(ch in name for ch in ',"\n') else name


def write_report(output_dir: str | os.PathLike, metrics: Mapping[str, Any], confusion: Tensor,
                 names: Sequence[str], header: str, rows: Sequence[Sequence[Any]]) -> list[str]:
    """metrics.json, per_class.csv (`header`, then one row of values per class after its
    name) and confusion.csv (rows: truth, columns: prediction); returns their paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = [header] + [",".join([csv_cell(n), *map(str, row)]) for n, row in zip(names, rows)]
    atomic_write_text(out / "per_class.csv", "\n".join(lines) + "\n")
    atomic_write_text(out / "confusion.csv",
        "true\\predicted," + ",".join(csv_cell(n) for n in names) + "\n" + "".join(
            f"{csv_cell(n)}," + ",".join(str(int(v)) for v in row) + "\n"
            for n, row in zip(names, confusion.tolist())))
    atomic_write_text(out / "metrics.json", json.dumps(dict(metrics), indent=1) + "\n")
    return [str(out / f) for f in ("metrics.json", "per_class.csv", "confusion.csv")]


def plot_confusion(confusion: Tensor, names: Sequence[str], path: str | os.PathLike,
                   ) -> str | None:
    """A confusion-matrix PNG (rows: true class, columns: predicted); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    k = len(names)
    cm = confusion.double()
    norm = cm / cm.sum(1, keepdim=True).clamp_min(1)
    size = min(4 + 0.35 * k, 40)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    if k <= 50:
        ax.set_xticks(range(k), names, rotation=90)
        ax.set_yticks(range(k), names)
        if k <= 20:
            for i in range(k):
                for j in range(k):
                    if cm[i, j] > 0:
                        ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                                color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (row-normalised colours, counts)")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return str(path)
