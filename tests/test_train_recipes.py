"""Recipes: which rule gives which value at which dataset size, step count and batch size;
the imagenet recipe pinned to the defaults it replaced; explicit settings always win."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from moat.train.config import TrainConfig, load_config
from moat.train.optim import ModelEma
from moat.train.recipes import RECIPE_FIELDS, RECIPES, UNSET, RunFacts, choose

# The defaults before recipes existed (TrainConfig's fields at commit 7116033), at batch 1024.
IMAGENET_1024 = dict(lr=1e-3, min_lr=1e-5, warmup_epochs=5.0, label_smoothing=0.1, mixup=0.8,
                     cutmix=1.0, randaugment=(2, 15), scale=(0.08, 1.0), ema=True,
                     ema_decay=0.9999, bn_momentum=None, drop_path_rate=None, layer_decay=None)

def _values(name: str, **facts) -> dict:
    return {k: s.value for k, s in RECIPES[name](RunFacts(**facts)).items()}

def test_imagenet_recipe_is_pinned_exactly():
    assert _values("imagenet", batch_size=1024, epochs=300, model="moat_0",
                   train_size=1_281_167) == IMAGENET_1024
    c = load_config(recipe="imagenet", batch_size=256)
    assert c.peak_lr == pytest.approx(2.5e-4)  # linear scaling, as before
    assert {k: getattr(c, k) for k in IMAGENET_1024 if k != "lr"} == \
        {k: v for k, v in IMAGENET_1024.items() if k != "lr"}
    # a TrainConfig built by hand takes the same recipe, whose values live in the recipe alone
    assert {k: getattr(TrainConfig(), k) for k in IMAGENET_1024 if k != "lr"} == \
        {k: v for k, v in IMAGENET_1024.items() if k != "lr"}
    assert all(f.default is UNSET for f in dataclasses.fields(TrainConfig)
               if f.name in RECIPE_FIELDS)

def test_every_recipe_sets_the_same_fields():
    for name, recipe in RECIPES.items():
        assert tuple(recipe(RunFacts(batch_size=64, epochs=20, model="tiny_moat_0",
                                     train_size=1000))) == RECIPE_FIELDS, name

@pytest.mark.parametrize("train_size, batch, epochs, steps, strength", [
    (150, 32, 30, 120, 0.0),            # a few hundred steps: no heavy augmentation
    (1440, 64, 20, 440, 0.0),
    (10_000, 100, 100, 10_000, 0.5),    # log-linear between 1k and 100k steps
    (1_281_167, 1024, 300, 375_300, 1.0),  # ImageNet
])
def test_schedule_strength(train_size, batch, epochs, steps, strength):
    f = RunFacts(batch_size=batch, epochs=epochs, model="moat_0", train_size=train_size)
    assert f.steps == steps
    assert f.strength == pytest.approx(strength)

def test_scratch_short_run_on_small_data():
    v = _values("scratch", batch_size=64, epochs=20, model="tiny_moat_0", train_size=1440)
    # 22 steps per epoch x 20 = 440 steps
    assert v["lr"] == pytest.approx(1e-3) and v["min_lr"] == pytest.approx(1e-5)
    assert v["warmup_epochs"] == pytest.approx(1.0)  # 5% of 20 epochs
    assert (v["mixup"], v["cutmix"], v["randaugment"]) == (0.0, 0.0, None)
    assert v["scale"] == (0.5, 1.0)
    assert v["ema"] is True and v["ema_decay"] == pytest.approx(1 - 10 / 440, abs=1e-6)
    assert v["bn_momentum"] == 0.1 and v["drop_path_rate"] == 0.0
    assert v["layer_decay"] is None

def test_scratch_long_run_approaches_imagenet_strength():
    v = _values("scratch", batch_size=1024, epochs=300, model="moat_0", train_size=1_281_167)
    assert (v["mixup"], v["cutmix"], v["randaugment"], v["scale"]) == \
        (0.8, 1.0, (2, 15), (0.08, 1.0))
    assert v["ema_decay"] == 0.9999 and v["bn_momentum"] == 0.01
    assert v["warmup_epochs"] == 5.0 and v["lr"] == pytest.approx(1e-3)
    from moat.models import MODEL_CONFIGS

    assert v["drop_path_rate"] == pytest.approx(1 - MODEL_CONFIGS["moat_0"].survival_prob)
    mid = _values("scratch", batch_size=100, epochs=100, model="moat_0", train_size=10_000)
    assert (mid["mixup"], mid["cutmix"], mid["randaugment"], mid["scale"]) == \
        (0.4, 0.5, (2, 8), (0.29, 1.0))  # strength 0.5 at 10k steps
    assert mid["bn_momentum"] == 0.01 and mid["ema_decay"] == pytest.approx(0.999)

@pytest.mark.parametrize("batch, lr", [(1, 1e-3 * (1 / 32) ** 0.5), (8, 5e-4), (32, 1e-3),
                                       (64, 1e-3), (1024, 1e-3), (4096, 2e-3)])
def test_scratch_lr_does_not_collapse_at_small_batches(batch, lr):
    v = _values("scratch", batch_size=batch, epochs=30, model="tiny_moat_0", train_size=5000)
    assert v["lr"] == pytest.approx(lr)
    assert v["min_lr"] == pytest.approx(lr / 100)

def test_finetune_recipe():
    v = _values("finetune", batch_size=32, epochs=10, model="tiny_moat_0", train_size=320)
    assert v["lr"] == pytest.approx(2e-4) and v["layer_decay"] == 0.75
    assert v["warmup_epochs"] == pytest.approx(0.5)  # 5% of the schedule, at most 1 epoch
    assert (v["mixup"], v["cutmix"], v["randaugment"]) == (0.0, 0.0, None)
    long = _values("finetune", batch_size=1024, epochs=300, model="moat_0",
                   train_size=1_281_167)
    assert (long["mixup"], long["randaugment"], long["warmup_epochs"]) == (0.4, (2, 8), 1.0)

def test_choose():
    assert choose("auto", False, False)[0] == "scratch"
    assert choose("auto", True, False)[0] == "finetune"
    assert choose("auto", True, True)[0] == "imagenet"  # the task's own defaults rule
    assert choose("imagenet", True, False)[0] == "imagenet"

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """150 training images, 2 classes."""
    from moat.data.synthetic import write_shapes_dataset

    root = tmp_path_factory.mktemp("recipe-data")
    write_shapes_dataset(root, num_classes=2, train_per_class=75, val_per_class=2, img_size=16)
    return root

def test_load_config_resolves_from_the_data_and_records_the_rules(folder, tmp_path):
    c = load_config(None, [], data=str(folder), model="tiny_moat_0", epochs=30, batch_size=32)
    assert c.recipe == "scratch" and c.sources["recipe"].startswith("scratch (auto")
    assert c.ema_decay == pytest.approx(1 - 10 / 120, abs=1e-6)  # 4 steps x 30 epochs
    assert c.sources["ema_decay"].startswith("recipe scratch: 1 - 10 / steps")
    assert c.sources["mixup"] == "recipe scratch: 0.8 x strength 0.00 at 120 steps"
    assert c.sources["epochs"] == "command line"
    c.save(tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "sources:" in text and "1 - 10 / steps" in text
    # a run's config.yaml used as a config file reproduces the run (its record is not a setting)
    again = load_config(tmp_path / "config.yaml")
    assert {k: getattr(again, k) for k in RECIPE_FIELDS} == \
        {k: getattr(c, k) for k in RECIPE_FIELDS}
    assert again.sources["lr"] == f"config file {tmp_path / 'config.yaml'}"

def test_explicit_settings_win(folder, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("mixup: 0.3\nema: false\n")
    c = load_config(cfg, ["randaugment=null", "scale=[0.2, 1.0]"], data=str(folder),
                    model="tiny_moat_0", epochs=30, batch_size=32, lr=0.01, recipe="imagenet")
    assert (c.mixup, c.ema, c.randaugment, c.scale, c.lr) == (0.3, False, None, (0.2, 1.0), 0.01)
    assert c.sources["mixup"] == f"config file {cfg}" and c.sources["lr"] == "command line"
    assert c.sources["randaugment"] == "--set"
    assert c.cutmix == 1.0 and c.sources["cutmix"] == "recipe imagenet: 1.0"
    # resuming: the stored values are the base, whatever the recipe would say now
    stored = c.to_dict()
    resumed = load_config(None, [], base=stored, epochs=300)
    assert (resumed.mixup, resumed.cutmix, resumed.lr, resumed.epochs) == (0.3, 1.0, 0.01, 300)
    assert resumed.sources["cutmix"] == "recipe imagenet: 1.0"

def test_from_weights_picks_finetune(folder):
    c = load_config(data=str(folder), model="tiny_moat_0", epochs=10, batch_size=32,
                    init_from="some.safetensors")
    assert c.recipe == "finetune" and c.layer_decay == 0.75
    assert load_config(data=str(folder), model="tiny_moat_0", pretrained=True,
                       epochs=10, batch_size=32).recipe == "finetune"

@pytest.mark.parametrize("batch", [1, 4, 8, 10])
def test_small_batches_are_accepted(folder, batch):
    """Before recipes, batch <= 10 without --lr was refused: 1e-3 x batch / 1024 < min_lr."""
    c = load_config(data=str(folder), model="tiny_moat_0", epochs=2, batch_size=batch)
    assert 0 < c.min_lr < c.peak_lr

def test_unknown_recipe():
    with pytest.raises(ValueError, match="recipe 'fast' is unknown; choose auto or one of"):
        load_config(recipe="fast")

def test_ema_decay_warms_up_with_the_step_count():
    """min(decay, (1 + n) / (10 + n)) after n updates: known values, and the average itself."""
    lin = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(lin.weight)
    ema = ModelEma(lin, decay=0.95)
    expected, average = [], 0.0
    for n in range(1, 201):
        with torch.no_grad():
            lin.weight.fill_(float(n))
        ema.update(lin)
        d = min(0.95, (1 + n) / (10 + n))
        average = d * average + (1 - d) * n
        expected.append(d)
        assert ema.current_decay() == pytest.approx(d)
    assert expected[0] == pytest.approx(2 / 11) and expected[9] == pytest.approx(11 / 20)
    assert expected[79] == pytest.approx(0.9) and expected[-1] == 0.95  # n = 80: 81 / 90
    assert ema.module.weight.item() == pytest.approx(average, rel=1e-5)
    # after 200 steps the average follows the recent weights, not the initial ones
    assert ema.module.weight.item() > 150
