"""Training recipes: named sets of defaults, each value with the rule that chose it.

A recipe fills the settings a run did not set itself; anything set by the task's defaults, a
config file, a flag or `--set` wins. `--recipe auto` (the default) picks:

    the task brings its own defaults (segmentation, detection) -> imagenet under them
    training starts from weights (init_from or pretrained)     -> finetune
    otherwise                                                   -> scratch

(A task's own defaults were tuned on top of `imagenet`'s values, so those stay under them.)

- `imagenet`: the paper-like recipe for 300 epochs at batch 1024 (the source of each value
  in its docstring); also what a `TrainConfig` built by hand, without a recipe, trains with.
- `scratch`: training from scratch on the data at hand. It adapts to the run: the learning
  rate does not shrink below batch 1024 (AdamW's step size does not depend on the batch the
  way SGD's does), and augmentation, regularisation, the EMA and BatchNorm statistics follow
  the number of optimiser steps. Measured on real image sets with benchmarks/own_images.py.
- `finetune`: starting from pretrained weights, the usual practice of BEiT / ConvNeXt / timm
  fine-tuning: a lower learning rate with layer-wise decay 0.75, a short warm-up, half the
  from-scratch regularisation for the same schedule.

The schedule length is `steps` = epochs x (training samples // global batch). Its `strength`
s = clip(log10(steps / 1000) / 2, 0, 1) is 0 up to 1k steps (a few hundred steps learn
nothing through Mixup, CutMix and RandAugment 15) and 1 from 100k steps (ImageNet, 300
epochs at batch 1024 is 375k steps), log-linear in between.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moat.errors import InvalidInputError
from moat.models.config import MODEL_CONFIGS

class _Unset:
    """TrainConfig's default for a field a recipe owns: nobody set it yet."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()

# Every recipe sets exactly these TrainConfig fields (which default to UNSET there).
RECIPE_FIELDS = ("lr", "min_lr", "warmup_epochs", "label_smoothing", "mixup", "cutmix",
                 "randaugment", "scale", "ema", "ema_decay", "bn_momentum", "drop_path_rate",
                 "layer_decay")


@dataclass(frozen=True)
class RunFacts:
    """What the recipes adapt to."""

    batch_size: int            # global
    epochs: int
    model: str
    train_size: int | None = None  # training samples; None: unknown (no data given)
    lr_base: float = 1e-3
    lr_base_batch: int = 1024

    @property
    def steps(self) -> int | None:
        if self.train_size is None:
            return None
        return self.epochs * max(1, self.train_size // self.batch_size)

    @property
    def strength(self) -> float:
        """0 (a short schedule: no heavy augmentation) .. 1 (ImageNet length); 1 if unknown."""
        if self.steps is None:
            return 1.0
        return min(1.0, max(0.0, math.log10(self.steps / 1000) / 2))


@dataclass(frozen=True)
class Setting:
    value: Any
    rule: str


Recipe = Callable[[RunFacts], dict[str, Setting]]


def imagenet(f: RunFacts) -> dict[str, Setting]:
    """The paper-like ImageNet recipe. Sources: [model] = the variant's official setting,
    [practice] = common ImageNet practice of CoAtNet / MaxViT / timm (the paper's recipe
    details are not available): lr 1e-3 per 1024 images, 5 warm-up epochs then cosine to
    1e-5, label smoothing 0.1, RandAugment (2, 15), Mixup 0.8 / CutMix 1.0, EMA 0.9999
    [practice]; drop path and BatchNorm momentum [model]."""
    lr = f.lr_base * f.batch_size / f.lr_base_batch
    return {
        "lr": Setting(lr, f"{f.lr_base:g} x batch / {f.lr_base_batch} (linear scaling)"),
        "min_lr": Setting(min(1e-5, lr), "1e-5 (the peak lr if lower)"),
        "warmup_epochs": Setting(5.0, "5 epochs"),
        "label_smoothing": Setting(0.1, "0.1"),
        "mixup": Setting(0.8, "0.8"),
        "cutmix": Setting(1.0, "1.0"),
        "randaugment": Setting((2, 15), "2 ops at magnitude 15"),
        "scale": Setting((0.08, 1.0), "Inception crops, 8-100% of the area"),
        "ema": Setting(True, "on"),
        "ema_decay": Setting(0.9999, "0.9999"),
        "bn_momentum": Setting(None, "the model's (official 0.01)"),
        "drop_path_rate": Setting(None, "the variant's official rate"),
        "layer_decay": Setting(None, "off"),
    }


def scratch(f: RunFacts) -> dict[str, Setting]:
    return _adaptive(f, f.lr_base, f.strength, "")


def finetune(f: RunFacts) -> dict[str, Setting]:
    out = _adaptive(f, f.lr_base / 5, f.strength / 2, " (half strength: pretrained features)")
    out["warmup_epochs"] = Setting(min(1.0, 0.05 * f.epochs),
                                   "5% of the schedule, at most 1 epoch")
    out["layer_decay"] = Setting(0.75, "0.75 (BEiT / ConvNeXt fine-tuning)")
    return out


RECIPES: dict[str, Recipe] = {"imagenet": imagenet, "scratch": scratch, "finetune": finetune}


def _adaptive(f: RunFacts, lr_base: float, s: float, why: str) -> dict[str, Setting]:
    steps = f.steps
    at = "unknown steps" if steps is None else f"{steps} steps"
    strength = f"strength {s:.2f} at {at}{why}"
    lr = lr_base * math.sqrt(f.batch_size / min(max(f.batch_size, 32), f.lr_base_batch))
    magnitude = round(15 * s)
    # here, not at the top: `moat train --help` reads this module and must not import torch
    from moat.weights.catalogue import split_name
    from moat.weights.hub import is_hub_name

    variant = None if is_hub_name(f.model) else split_name(f.model)[0]
    survival = MODEL_CONFIGS[variant].survival_prob if variant in MODEL_CONFIGS else 1.0
    if steps is None:
        ema_decay, bn, bn_rule = 0.9999, None, "the model's (official 0.01): steps unknown"
    else:
        ema_decay = round(min(0.9999, max(0.9, 1 - 10 / steps)), 6)
        bn = round(min(0.1, max(0.01, 100 / steps)), 4)
        bn_rule = "100 / steps within [0.01 official, 0.1]: statistics of the last ~1%"
    return {
        "lr": Setting(lr, f"{lr_base:g} at batch 32..{f.lr_base_batch}, square-root scaling "
                          "outside"),
        "min_lr": Setting(lr / 100, "1% of the peak lr"),
        "warmup_epochs": Setting(min(5.0, 0.05 * f.epochs), "5% of the schedule, at most 5 "
                                                            "epochs"),
        "label_smoothing": Setting(0.1, "0.1"),
        "mixup": Setting(round(0.8 * s, 3), f"0.8 x {strength}"),
        "cutmix": Setting(round(1.0 * s, 3), f"1.0 x {strength}"),
        "randaugment": Setting((2, magnitude) if magnitude >= 1 else None,
                               f"2 ops at magnitude 15 x {strength} (off below 1)"),
        "scale": Setting((round(0.5 - 0.42 * s, 3), 1.0),
                         f"crops of 50% (short) to 8% (long) of the area, {strength}"),
        "ema": Setting(True, "on; evaluated beside the raw weights, the better one is kept"),
        "ema_decay": Setting(ema_decay, "1 - 10 / steps within [0.9, 0.9999]: averages the "
                                        "last ~10% of the steps"),
        "bn_momentum": Setting(bn, bn_rule),
        "drop_path_rate": Setting(round((1 - survival) * s, 3),
                                  f"the variant's official rate x {strength}"),
        "layer_decay": Setting(None, "off"),
    }


def choose(name: str, from_weights: bool, task_has_defaults: bool) -> tuple[str, str]:
    """(recipe, why) for `--recipe name` (auto: by the run)."""
    if name != "auto":
        return name, "chosen with --recipe / recipe:"
    if task_has_defaults:
        return "imagenet", "auto: the task brings its own defaults, tuned over imagenet's"
    if from_weights:
        return "finetune", "auto: training starts from weights (init_from / pretrained)"
    return "scratch", "auto: training from scratch"


def resolve(name: str, facts: RunFacts, explicit: dict[str, str],
            ) -> tuple[dict[str, Any], dict[str, str]]:
    """(values for the fields nobody set, {field: the rule or source of its value})."""
    if name not in RECIPES:
        raise InvalidInputError(f"recipe {name!r} is unknown; choose auto or one of "
                                f"{sorted(RECIPES)}")
    settings = RECIPES[name](facts)
    values = {k: s.value for k, s in settings.items() if k not in explicit}
    rules = {k: explicit.get(k) or f"recipe {name}: {s.rule}" for k, s in settings.items()}
    return values, rules
