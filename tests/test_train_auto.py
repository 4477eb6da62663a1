"""What a run gets when nobody sets its batch size, epochs, workers or the EMA evaluation
(moat/train/auto.py), and the evaluation pass that runs the model and its EMA together
(Task.evaluate_models, Trainer._evaluate)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moat
from moat.train.auto import Machine, batch_size, ema_eval_from_epoch, epochs, workers
from moat.train.config import load_config
from moat.train.loop import train
from moat.tasks.base import get_task

CPU2 = Machine(cores=2, memory=24 << 30, gpus=0)


def test_rules_on_known_machines():
    # 300 samples: >= 8 steps per epoch -> 37 -> 32, the CPU's batch
    assert batch_size(300, 64, CPU2).value == 32
    assert batch_size(100, 64, CPU2).value == 8
    # 224 px: a quarter of 24 GiB holds 20 images of MOAT-0's 500 floats per input value
    assert batch_size(10_000, 224, CPU2).value == 16
    assert batch_size(100_000, 224, Machine(32, 512 << 30, gpus=4)).value == 512
    assert batch_size(100_000, 224, Machine(32, 512 << 30, gpus=16)).value == 1024
    assert batch_size(300, 64, CPU2, divisor=3).value == 30  # processes x accum_steps
    # ~1000 steps on a CPU: 300 // 32 = 9 steps per epoch -> 112 epochs
    assert epochs(300, 32, "scratch", CPU2).value == 112
    assert epochs(1_281_167, 1024, "scratch", Machine(8, 64 << 30, gpus=8)).value == 8
    assert epochs(100, 32, "finetune", CPU2).value == 300
    assert epochs(300, 32, "imagenet", CPU2).value == 300
    assert workers(CPU2).value == 0
    assert workers(Machine(16, 64 << 30, gpus=0)).value == 4
    assert workers(Machine(16, 64 << 30, gpus=2, processes=2)).value == 7
    # horizon 1 / (1 - 0.99) = 100 updates at 62 steps per epoch: from epoch 2
    assert ema_eval_from_epoch(0.99, 62, 10).value == 2
    assert ema_eval_from_epoch(0.9999, 10, 5).value == 5  # never warm: the last epoch only
    assert ema_eval_from_epoch(0.9, None, 5).value == 1


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """3 classes x 100 training images: a first user's folder."""
    from moat.data.synthetic import write_shapes_dataset

    root = tmp_path_factory.mktemp("shapes300")
    write_shapes_dataset(root, num_classes=3, train_per_class=100, val_per_class=2, img_size=32)
    return root


def test_a_run_with_nothing_but_the_data_fits_it_and_records_why(data, tmp_path, monkeypatch):
    monkeypatch.setattr(Machine, "this", classmethod(lambda cls, device="auto": CPU2))
    config = load_config(None, data=str(data), model="tiny_moat_0", output=str(tmp_path),
                         img_size=64)
    assert (config.batch_size, config.epochs, config.workers) == (32, 112, 0)
    assert config.sources["batch_size"].startswith("auto: the largest power of two")
    assert config.sources["epochs"].startswith("auto: ~1000 optimiser steps on a CPU")
    assert config.sources["workers"].startswith("auto: 2 CPU cores")
    # the recipe adapts to the chosen schedule: 112 x 9 = 1008 steps
    assert "1008 steps" in config.sources["mixup"]
    horizon = round(1 / (1 - config.ema_decay))
    assert config.ema_eval_from_epoch == -(-horizon // 9)
    assert config.sources["ema_eval_from_epoch"].startswith(f"auto: from {horizon} EMA")
    # what the user sets wins, and is recorded as theirs
    mine = load_config(None, data=str(data), model="tiny_moat_0", output=str(tmp_path),
                       batch_size=64, workers=1, epochs=3)
    assert (mine.batch_size, mine.epochs, mine.workers) == (64, 3, 1)
    assert {mine.sources[k] for k in ("batch_size", "epochs", "workers")} == {"command line"}


def test_model_and_ema_are_evaluated_in_one_pass():
    """evaluate_models gives each model the metrics evaluate gives it alone, reading the
    batches once."""
    task = get_task("classification")(load_config(None, model="tiny_moat_0", num_classes=3))
    torch.manual_seed(0)
    a, b = (moat.create_model("tiny_moat_0", num_classes=3).eval() for _ in range(2))
    batches = [(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])) for _ in range(3)]

    class Once:
        passes = 0

        def __iter__(self):
            Once.passes += 1
            return iter(batches)

    with torch.no_grad():
        both = task.evaluate_models({"model": a, "ema": b}, Once(), torch.device("cpu"))
        assert Once.passes == 1
        assert both["model"] == task.evaluate(a, batches, torch.device("cpu"))
        assert both["ema"] == task.evaluate(b, batches, torch.device("cpu"))
    assert both["model"]["images"] == 12 and both["model"] != both["ema"]


def test_ema_is_evaluated_from_its_epoch_and_at_the_last(data, tmp_path):
    run = tmp_path / "run"
    train(load_config(None, [], data=str(data), output=str(run), model="tiny_moat_0",
                      img_size=32, batch_size=100, epochs=3, workers=0, progress=False,
                      tensorboard=False, ema_decay=0.9, ema_eval_from_epoch=3))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    assert [e["epoch"] for e in evals] == [1, 2, 3]
    assert ["ema/top-1" in e for e in evals] == [False, False, True]
    assert all("top-1" in e for e in evals)
