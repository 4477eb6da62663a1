"""TrainConfig: defaults, files, command-line overrides and their validation."""

from __future__ import annotations

import json

import pytest

from moat.train.config import TrainConfig, load_config, parse_overrides


def test_defaults_are_the_documented_recipe():
    c = load_config(recipe="imagenet")
    assert (c.epochs, c.img_size, c.optimizer, c.weight_decay, c.label_smoothing) == \
        (300, 224, "adamw", 0.05, 0.1)
    assert (c.mixup, c.cutmix, c.ema, c.clip_grad, c.drop_path_rate) == (0.8, 1.0, True, 1.0, None)
    assert c.peak_lr == pytest.approx(1e-3)  # 1e-3 at batch 1024
    assert load_config(batch_size=256, recipe="imagenet").peak_lr == pytest.approx(2.5e-4)


def test_overrides_are_typed():
    c = load_config(None, ["lr=1e-3", "epochs=1e1", "randaugment=2,9", "betas=[0.9, 0.95]",
                           "clip_grad=none", "window_size=[null, null, 14, null]", "ema=false",
                           "task_options.ignore_index=255", "task_options.name=ade",
                           "mean=[0.5, 0.5, 0.5]"])
    assert c.lr == 1e-3 and isinstance(c.lr, float)
    assert c.epochs == 10 and isinstance(c.epochs, int)
    assert c.randaugment == (2, 9) and c.betas == (0.9, 0.95)
    assert c.clip_grad is None and c.ema is False
    assert c.window_size == [None, None, 14, None]
    assert c.task_options == {"ignore_index": 255, "name": "ade"}
    assert c.mean == (0.5, 0.5, 0.5)
    assert load_config(None, ["randaugment=null"]).randaugment is None


def test_precedence_file_then_flags_then_set(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("model: tiny_moat_1\nepochs: 7\nlr: 0.002\ntask_options:\n  a: 1\n")
    c = load_config(yaml_file, ["lr=0.003"], epochs=9)
    assert (c.model, c.epochs, c.lr, c.task_options) == ("tiny_moat_1", 9, 0.003, {"a": 1})
    json_file = tmp_path / "c.json"
    json_file.write_text(json.dumps({"img_size": 96, "mixup": 0}))
    c = load_config(json_file)
    assert (c.img_size, c.mixup) == (96, 0.0)
    # a stored config (resume) is the base the file and flags override
    c = load_config(json_file, base={"epochs": 3, "img_size": 64})
    assert (c.epochs, c.img_size) == (3, 96)


def test_round_trip(tmp_path):
    c = load_config(None, ["randaugment=null", "task_options.k=[1, 2]"], model="tiny_moat_0")
    c.save(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == c
    c.save(tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == c


@pytest.mark.parametrize("overrides, message", [
    (["lrr=1"], "did you mean lr"),
    (["epochs=1.5"], "expected an integer"),
    (["epochs=0"], "epochs must be >= 1"),
    (["precision=fp8"], "precision 'fp8' is unknown"),
    (["ema=maybe"], "expected true or false"),
    (["model=moat_9"], "model 'moat_9' is unknown"),
    (["batch_size=10", "accum_steps=3"], "not divisible"),
    (["layer_decay=1.5"], "layer_decay"),
    (["frozen_stages=7"], "frozen_stages"),
    (["novalue"], "KEY=VALUE"),
    (["task=nosuchtask"], "unknown task"),
])
def test_errors_are_clear(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(bad)
    bad.write_text("epochs: [1\n")
    with pytest.raises(ValueError, match="invalid YAML"):
        load_config(bad)


def test_parse_overrides_keeps_strings():
    assert parse_overrides(["a=1", "b = x=y"]) == {"a": "1", "b": "x=y"}


def test_task_defaults_apply_before_file(monkeypatch):
    from moat.tasks.base import TASKS, Task

    class Dummy(Task):
        name = "dummy-test-task"
        config_defaults = {"mixup": 0.0, "epochs": 50}

    monkeypatch.setitem(TASKS, Dummy.name, Dummy)
    c = load_config(None, ["epochs=5"], task=Dummy.name)
    assert (c.mixup, c.epochs, c.task) == (0.0, 5, Dummy.name)
    assert TrainConfig().mixup == 0.8


def test_channels_last_is_the_default_and_can_be_turned_off(monkeypatch):
    from moat.cli import main

    assert load_config().channels_last is True
    seen = []
    monkeypatch.setattr("moat.train.loop.run_training",
                        lambda config, sets, resume, **flags: seen.append(flags)
                        or {"metrics": None, "checkpoint": "-"})
    for argv, expected in ((["train"], None), (["train", "--no-channels-last"], False),
                           (["train", "--channels-last"], True)):
        assert main(argv) == 0
        assert seen[-1]["channels_last"] is expected
    assert load_config(channels_last=None).channels_last is True  # None: keep the default
