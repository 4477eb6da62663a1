"""Known-answer tests of the classification metrics: top-1, top-5, per-class accuracy, mean
per-class accuracy, loss and the confusion matrix, on logits chosen by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moat.tasks.classification import ClassificationTask
from moat.train.config import TrainConfig

# 6 classes, 5 images. Row i: the logits of image i; TARGETS[i]: its class.
LOGITS = torch.tensor([
    [5.0, 1.0, 0.0, 0.0, 0.0, 0.0],   # class 0, predicted 0: top-1 hit
    [0.0, 4.0, 0.0, 5.0, 0.0, 0.0],   # class 1, predicted 3; 1 is second: top-5 hit
    [1.0, 1.0, -9.0, 0.0, 2.0, 1.0],  # class 2, predicted 4; 2 is last of 6: top-5 miss
    [0.0, 0.0, 3.0, 0.0, 0.0, 0.0],   # class 2, predicted 2: top-1 hit
    [0.0, 3.0, 2.0, 1.0, -1.0, 0.5],  # class 5, predicted 1; 5 is fourth: top-5 hit
])
TARGETS = torch.tensor([0, 1, 2, 2, 5])


def _task() -> ClassificationTask:
    config = TrainConfig(model="tiny_moat_0", num_classes=6, channels_last=False)
    task = ClassificationTask(config)
    task.classes = [f"c{i}" for i in range(6)]
    return task


def _evaluate(batch_size: int) -> tuple[ClassificationTask, dict]:
    task = _task()
    batches = [(LOGITS[i:i + batch_size], TARGETS[i:i + batch_size])
               for i in range(0, len(TARGETS), batch_size)]
    return task, task.evaluate(nn.Identity(), batches, torch.device("cpu"))


def _cross_entropy(row: list[float], target: int) -> float:
    return math.log(sum(math.exp(v) for v in row)) - row[target]


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_known_answers(batch_size):
    task, metrics = _evaluate(batch_size)
    assert metrics["images"] == 5
    assert metrics["top-1"] == pytest.approx(100 * 2 / 5)   # images 0 and 3
    assert metrics["top-5"] == pytest.approx(100 * 4 / 5)   # all but image 2
    expected_loss = sum(_cross_entropy(r, t) for r, t in zip(LOGITS.tolist(), TARGETS.tolist()))
    assert metrics["loss"] == pytest.approx(expected_loss / 5, rel=1e-6)
    per_class = task.per_class_accuracy()
    assert per_class[:3] == [100.0, 0.0, 50.0] and per_class[5] == 0.0
    assert math.isnan(per_class[3]) and math.isnan(per_class[4])  # no images of classes 3, 4
    assert metrics["mean-class-acc"] == pytest.approx((100 + 0 + 50 + 0) / 4)
    expected = torch.zeros(6, 6, dtype=torch.int64)
    for true, predicted in ((0, 0), (1, 3), (2, 4), (2, 2), (5, 1)):
        expected[true, predicted] += 1
    assert torch.equal(task.confusion, expected)


def test_report_files_hold_the_same_numbers(tmp_path):
    task, metrics = _evaluate(2)
    task.write_report(metrics, str(tmp_path))
    rows = (tmp_path / "per_class.csv").read_text().splitlines()
    assert rows[0] == "class,accuracy,images"
    assert rows[1:4] == ["c0,100.00,1", "c1,0.00,1", "c2,50.00,2"] and rows[4] == "c3,,0"
    confusion = (tmp_path / "confusion.csv").read_text().splitlines()
    assert confusion[3] == "c2,0,0,1,0,1,0"  # class 2: once right, once taken for c4
