"""moat.tasks.confusion: the confusion matrix and report shared by classification (one entry
per image) and segmentation (one per labelled pixel)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from moat.tasks.confusion import (ConfusionMatrix, class_recall, confusion_matrix, csv_cell,
                                  write_report)


def test_counts_without_an_ignore_index_as_classification_uses_it():
    truth = torch.tensor([0, 0, 1, 2, 2, 2])
    top1 = torch.tensor([0, 1, 1, 2, 2, 255 % 3])  # 255 is a class id here, not "ignore"
    cm = confusion_matrix(top1, truth, 3, ignore_index=None)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    with pytest.raises(ValueError, match="label 255 is outside 0..2"):
        confusion_matrix(torch.tensor([0]), torch.tensor([255]), 3, ignore_index=None)


def test_accumulates_over_batches_and_reduces_to_the_cpu():
    cm = ConfusionMatrix(2, ignore_index=None)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    cm.update(torch.tensor([1]), torch.tensor([1]))
    total = cm.all_reduce(torch.device("cpu"))  # one process: the sum is the matrix
    assert total.device.type == "cpu" and total.tolist() == [[1, 1], [0, 1]]


def test_class_recall_is_nan_for_a_class_without_ground_truth():
    recall = class_recall(torch.tensor([[3, 1, 0], [0, 0, 0], [1, 0, 1]]))
    assert recall[0] == pytest.approx(0.75) and recall[2] == pytest.approx(0.5)
    assert math.isnan(recall[1])


def test_report_files(tmp_path):
    cm = torch.tensor([[2, 1], [0, 3]])
    names = ["cat", 'say "hi", dog']
    paths = write_report(tmp_path, {"top-1": 83.3}, cm, names, "class,accuracy,images",
                         [("66.67", 3), ("100.00", 3)])
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["metrics.json", "per_class.csv",
                                                     "confusion.csv"]
    quoted = csv_cell(names[1])
    assert quoted == '"say ""hi"", dog"'  # CSV's quoting: a spreadsheet reads the name back
    with open(tmp_path / "confusion.csv", newline="") as f:
        assert next(csv.reader(f)) == ["true\\predicted", *names]
    assert (tmp_path / "per_class.csv").read_text() == (
        f"class,accuracy,images\ncat,66.67,3\n{quoted},100.00,3\n")
    assert (tmp_path / "confusion.csv").read_text() == (
        f"true\\predicted,cat,{quoted}\ncat,2,1\n{quoted},0,3\n")
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"top-1": 83.3}
