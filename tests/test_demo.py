"""`moat demo --task ...` end to end on shrunken datasets: data -> train -> eval -> predict.

The full-size demos and their targets are measured by `benchmarks/demo.py`, not here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moat.cli import main
from moat.tasks import classification, detection, segmentation

pytestmark = pytest.mark.slow  # end to end: data, training, evaluation, prediction

SMALL_DATA = {
    "classification": (classification, {"train_per_class": 4, "val_per_class": 2}),
    "segmentation": (segmentation, {"train_size": 8, "val_size": 4, "img_size": 64}),
    "detection": (detection, {"num_train": 8, "num_val": 4, "img_size": 64}),
}
METRIC = {"classification": "top-1", "segmentation": "mIoU", "detection": "box AP50"}


@pytest.mark.parametrize("task", list(SMALL_DATA))
def test_demo_runs_end_to_end_and_continues(task, tmp_path, monkeypatch, capsys):
    module, small = SMALL_DATA[task]
    for key, value in small.items():
        monkeypatch.setitem(module.DEMO_DATA, key, value)
    args = ["demo", "--task", task, "--output", str(tmp_path), "--epochs", "1", "--no-progress",
            "--set", "batch_size=4", "--set", f"img_size={64 if task != 'classification' else 32}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert METRIC[task] in out
    checkpoint = next(line.split(": ", 1)[1] for line in out.splitlines()
                      if line.startswith("checkpoint: "))
    predictions = json.loads((tmp_path / "predictions.json").read_text())
    assert predictions
    if task != "classification":
        assert any((tmp_path / "predictions").glob("*.png"))  # drawings a person can look at
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert any(m.get("event") == "eval" for m in metrics)
    # the demo ends with the `moat app` command for its run, and the run explains itself
    assert out.rstrip().splitlines()[-1].endswith(f"moat app --checkpoint {tmp_path / 'run'}")
    sample = predictions[0]["path"]
    code = main(["explain", sample, "--checkpoint", str(tmp_path / "run"), "--output-dir",
                 str(tmp_path / "explain")])
    explained = capsys.readouterr().out
    assert code == 0, explained
    assert (tmp_path / "explain" / (Path(sample).stem + "_cam.png")).is_file()

    # Run again: the finished run is found and continued (nothing retrained, same checkpoint).
    assert main(args) == 0
    assert f"checkpoint: {checkpoint}" in capsys.readouterr().out
