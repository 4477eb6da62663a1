"""Training configuration: one dataclass holding every default, loaded from YAML/JSON plus
command-line overrides, validated with errors that say what to write instead.

Precedence, lowest first: the recipe (moat.train.recipes: `imagenet`, `scratch`, `finetune`;
`auto` picks one for the run), the task's `config_defaults`, the config file, then
command-line flags and `--set KEY=VALUE`. The recipe only fills what nobody set; `sources`
records, for every value the recipe owns and every value set explicitly, the rule or the
place it came from (config.yaml and train.log show it).

The fields a recipe owns (`recipes.RECIPE_FIELDS`) default to `UNSET` here: their values
live in the recipes alone, and a config built by hand takes the `imagenet` recipe's. The
other defaults below are the paper-like setting ([paper] = the MOAT paper, [practice] =
common ImageNet practice of CoAtNet / MaxViT / timm, as the paper's details are not
available; the recipe's values say their own sources in `moat.train.recipes.imagenet`):

    epochs 300, img_size 224 ......................................... [paper]
    AdamW, betas (0.9, 0.999), lr 1e-3 per 1024 images, wd 0.05 ...... [practice]
    gradient clipping at norm 1.0 .................................... [practice]
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moat.data.preprocessing import (CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, INTERPOLATION,
                                     INTERPOLATIONS)
from moat.errors import InvalidInputError
from moat.models.config import check_model_args
from moat.paths import regular_file
from moat.train import auto, recipes
from moat.train.recipes import RECIPES, UNSET, RunFacts
from moat.train.typed import coerce, jsonable, parse_scalar

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class TrainConfig:
    """Every setting of a training run. `batch_size` is GLOBAL: summed over processes and
    accumulation steps, so a recipe means the same thing on 1 CPU and on 64 GPUs."""

    # --- what to train ---------------------------------------------------------------------
    task: str = "classification"
    recipe: str = "auto"           # auto, imagenet, scratch, finetune (moat.train.recipes)
    model: str = "moat_0"
    data: str | None = None        # folder with train/ + val/ (or train.csv + val.csv), or a split
    val_data: str | None = None    # a separate validation split (folder or .csv)
    # shards and Hugging Face datasets: the image member/column and the label member/column
    # (or json field); None: found (moat.data.shards, moat.data.hf)
    image_key: str | None = None
    label_key: str | None = None
    output: str | None = None      # RUN_DIR: config, logs, metrics, checkpoints
    num_classes: int | None = None  # None: from the data
    img_size: int = 224
    eval_img_size: int | None = None  # None: img_size
    crop_pct: float = CROP_PCT     # eval: resize to img_size / crop_pct, centre-crop img_size
    interpolation: str = INTERPOLATION
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    # --- model options (moat.create_model) ----------------------------------------------------
    drop_path_rate: float | None = UNSET  # None: the variant's official default
    position_embedding: bool | None = None  # None: as the model name says (`_no_pe`: without)
    window_size: list | None = None      # one entry per stage, e.g. [null, null, 14, null]
    pool_size: int = 2
    bn_momentum: float | None = UNSET    # None: the model's (official 0.01, i.e. Keras 0.99);
    #                                      higher (0.1) suits short runs: eval statistics catch up

    # --- optimisation -----------------------------------------------------------------------
    epochs: int = 300
    batch_size: int = 1024
    accum_steps: int = 1
    optimizer: str = "adamw"
    lr: float | None = UNSET         # peak lr; None: lr_base * batch_size / lr_base_batch
    lr_base: float = 1e-3
    lr_base_batch: int = 1024
    min_lr: float = UNSET
    warmup_epochs: float = UNSET
    warmup_lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9            # sgd only
    weight_decay: float = 0.05       # not on norms, biases, position tables
    clip_grad: float | None = 1.0    # max global gradient norm; None or 0: off
    layer_decay: float | None = UNSET  # e.g. 0.75 for fine-tuning: lr * decay^(depth from head)
    frozen_stages: int = -1          # -1 none, 0 stem, K stem + stages 0..K-1 (4: whole backbone)
    init_from: str | None = None     # weights to fine-tune from (.safetensors/.pt/official/RUN_DIR)
    pretrained: bool = False         # fine-tune from the released weights of `model` (a tag,
                                     # e.g. moat_0.in1k_224, or hf-hub:/local-dir:), downloaded once

    # --- regularisation and augmentation ------------------------------------------------------
    label_smoothing: float = UNSET
    randaugment: tuple[int, int] | None = UNSET  # (ops, magnitude on torchvision's 0..30)
    mixup: float = UNSET
    cutmix: float = UNSET
    random_erasing: float = 0.0
    hflip: float = 0.5
    scale: tuple[float, float] = UNSET  # RandomResizedCrop area range
    ema: bool = UNSET
    ema_decay: float = UNSET

    # --- hardware -----------------------------------------------------------------------------
    device: str = "auto"             # auto: cuda:LOCAL_RANK if available, else cpu
    precision: str = "auto"          # auto: bf16 on GPUs that support it, else fp16; fp32 on CPU
    channels_last: bool = True       # faster on CPU and GPU; the fused CPU kernel needs it
    grad_checkpointing: bool = False
    compile: bool = False
    sync_bn: bool = False
    workers: int = 4                 # DataLoader processes per training process
    seed: int = 0
    deterministic: bool = False

    # --- checkpoints, evaluation, logging -----------------------------------------------------
    save_every_steps: int = 0        # also save mid-epoch every N optimiser steps (0: epoch ends)
    keep_last: int = 3
    eval_every_epochs: int = 1
    ema_eval_from_epoch: int | None = None  # evaluations include the EMA from this epoch on
    #                                          (and at the last); None: all (moat.train.auto)
    log_every_steps: int = 20
    progress: bool = True            # tqdm bar on rank 0
    tensorboard: bool = True
    strict_data: bool = False        # a bad image file stops the run instead of being skipped

    # --- task-specific settings (segmentation, detection, ...) --------------------------------
    task_options: dict[str, Any] = field(default_factory=dict)

    # --- written by load_config: {setting: the recipe rule or the place that set it} ------------
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    # ------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        # Built by hand rather than by load_config: the paper-like recipe fills what is unset.
        unset = [name for name in recipes.RECIPE_FIELDS if getattr(self, name) is UNSET]
        if unset:
            facts = RunFacts(batch_size=self.batch_size, epochs=self.epochs, model=self.model,
                             lr_base=self.lr_base, lr_base_batch=self.lr_base_batch)
            values, _ = recipes.resolve("imagenet", facts, {})
            for name in unset:
                setattr(self, name, values[name])

    @property
    def peak_lr(self) -> float:
        """The learning rate after warm-up (linear scaling rule unless `lr` is given)."""
        return self.lr if self.lr is not None else self.lr_base * self.batch_size / self.lr_base_batch

    @property
    def model_position_embedding(self) -> bool:
        """`position_embedding`, or when unset what the model name says (`_no_pe`: without)."""
        if self.position_embedding is not None:
            return self.position_embedding
        from moat.weights.catalogue import split_name
        from moat.weights.hub import is_hub_name
        return is_hub_name(self.model) or split_name(self.model)[1]

    def validate(self, recipe_fields: bool = True) -> TrainConfig:
        """Raise InvalidInputError naming the first wrong setting and a valid alternative.

        `recipe_fields=False` checks only what the recipes are derived from (every other
        field), so a wrong value is refused before anything is computed from it."""
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise InvalidInputError(f"config: {message}")

        from moat.models import list_models
        from moat.weights.catalogue import split_name
        from moat.weights.hub import is_hub_name

        for name, value in self.to_dict().items():  # nan or inf anywhere is never meant
            numbers = value if isinstance(value, list) else [value]
            need(all(math.isfinite(v) for v in numbers if isinstance(v, float)),
                 f"{name} must be a finite number, got {value}")
        need(self.recipe == "auto" or self.recipe in RECIPES,
             f"recipe {self.recipe!r} is unknown; choose auto or one of {sorted(RECIPES)}")
        if not is_hub_name(self.model):  # hub folders name their architecture themselves
            need(split_name(self.model)[0] in list_models(),
                 f"model {self.model!r} is unknown; choose one of {list_models()}, a "
                 "pretrained tag (moat.list_pretrained()), hf-hub:ORG/NAME or local-dir:PATH")
        need(not (self.pretrained and self.init_from),
             "pretrained and init_from both name starting weights; keep one")
        need(self.img_size >= 16, f"img_size must be >= 16, got {self.img_size}")
        need(self.eval_img_size is None or self.eval_img_size >= 16,
             f"eval_img_size must be >= 16, got {self.eval_img_size}")
        need(0 < self.crop_pct <= 1, f"crop_pct must be in (0, 1], got {self.crop_pct}")
        need(self.interpolation.lower() in INTERPOLATIONS,
             f"interpolation {self.interpolation!r} is unknown; choose one of {INTERPOLATIONS}")
        need(all(s > 0 for s in self.std), f"std must be three numbers > 0, got {self.std}")
        need(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.accum_steps >= 1, f"accum_steps must be >= 1, got {self.accum_steps}")
        micro_batch(self.batch_size, self.accum_steps)
        need(self.optimizer in OPTIMIZERS,
             f"optimizer {self.optimizer!r} is unknown; choose one of {OPTIMIZERS}")
        need(self.lr_base > 0, f"lr_base must be > 0, got {self.lr_base}")
        need(self.lr_base_batch >= 1, f"lr_base_batch must be >= 1, got {self.lr_base_batch}")
        need(self.warmup_lr >= 0, f"warmup_lr must be >= 0, got {self.warmup_lr}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(all(0 <= b < 1 for b in self.betas), f"betas must be in [0, 1), got {self.betas}")
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        need(self.clip_grad is None or self.clip_grad >= 0,
             f"clip_grad must be >= 0 or null, got {self.clip_grad}")
        need(0 <= self.random_erasing <= 1 and 0 <= self.hflip <= 1,
             "random_erasing and hflip are probabilities in [0, 1]")
        need(self.precision in PRECISIONS,
             f"precision {self.precision!r} is unknown; choose one of {PRECISIONS}")
        need(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps", "xpu"),
             f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        need(self.workers >= 0, f"workers must be >= 0, got {self.workers}")
        need(0 <= self.seed < 2**32, f"seed must be in 0 .. 2**32-1, got {self.seed}")
        need(self.keep_last >= 1, f"keep_last must be >= 1, got {self.keep_last}")
        need(self.save_every_steps >= 0, "save_every_steps must be >= 0 (0: only at epoch ends)")
        need(self.eval_every_epochs >= 0, "eval_every_epochs must be >= 0 (0: never)")
        need(self.ema_eval_from_epoch is None or self.ema_eval_from_epoch >= 1,
             f"ema_eval_from_epoch must be >= 1 or null, got {self.ema_eval_from_epoch}")
        need(self.log_every_steps >= 1, "log_every_steps must be >= 1")
        try:  # the model's own rules (moat.models.config), before anything is built
            check_model_args(pool_size=self.pool_size, frozen_stages=self.frozen_stages)
        except ValueError as err:
            raise InvalidInputError(f"config: {err}") from None
        need(self.num_classes is None or self.num_classes >= 1,
             f"num_classes must be >= 1 or null (from the data), got {self.num_classes}")
        if not recipe_fields:
            return self
        # the fields a recipe fills (moat.train.recipes.RECIPE_FIELDS)
        need(self.peak_lr > 0, f"lr must be > 0, got {self.peak_lr}")
        need(0 <= self.min_lr <= self.peak_lr,
             f"min_lr must be in [0, lr={self.peak_lr:g}], got {self.min_lr}")
        need(self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        need(self.layer_decay is None or 0 < self.layer_decay <= 1,
             f"layer_decay must be in (0, 1] or null, got {self.layer_decay}")
        need(self.drop_path_rate is None or 0 <= self.drop_path_rate < 1,
             f"drop_path_rate must be in [0, 1) or null, got {self.drop_path_rate}")
        need(0 <= self.label_smoothing < 1,
             f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        need(self.mixup >= 0 and self.cutmix >= 0, "mixup and cutmix must be >= 0 (0: off)")
        need(self.randaugment is None or (len(self.randaugment) == 2 and self.randaugment[0] >= 0
                                          and 0 <= self.randaugment[1] <= 30),
             f"randaugment must be [ops, magnitude 0..30] or null, got {self.randaugment}")
        need(0 < self.scale[0] <= self.scale[1] <= 1,
             f"scale must be [min, max] area fractions with 0 < min <= max <= 1, got {self.scale}")
        need(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")
        need(self.bn_momentum is None or 0 < self.bn_momentum <= 1,
             f"bn_momentum must be in (0, 1] or null, got {self.bn_momentum}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))

    def save(self, path: str | os.PathLike) -> None:
        """Write as YAML (or JSON when the name ends in .json), atomically."""
        from moat.integrity import atomic_write_text

        path = Path(path)
        if path.suffix == ".json":
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        else:
            import yaml

            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        atomic_write_text(path, text)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], base: TrainConfig | None = None,
                  source: str = "config") -> TrainConfig:
        """A config with `values` applied over `base` (the defaults if None); checked."""
        config = dataclasses.replace(base) if base is not None else cls()
        config.task_options = dict(config.task_options)
        for key, value in values.items():
            _set(config, str(key), value, source)
        return config


def micro_batch(batch_size: int, accum_steps: int, world_size: int = 1) -> int:
    """Samples per forward pass: the global batch split over processes and accumulation."""
    if batch_size % (world_size * accum_steps):
        raise InvalidInputError(f"config: batch_size {batch_size} is not divisible by processes "
                                f"({world_size}) x accum_steps ({accum_steps})")
    return batch_size // (world_size * accum_steps)


# --- loading ---------------------------------------------------------------------------------

def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or JSON (.json) mapping of TrainConfig fields."""
    path = regular_file(path, "config file")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise InvalidInputError(f"{path}: invalid JSON: {err}") from None
    else:
        import yaml

        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise InvalidInputError(f"{path}: invalid YAML: {err}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise InvalidInputError(f"{path}: expected a mapping of settings (key: value), "
                                f"got {type(values).__name__}")
    return values


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """['lr=1e-3', 'task_options.crop=512'] -> {'lr': '1e-3', 'task_options.crop': '512'}.

    Values stay strings here; `_set` converts them to the field's type.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidInputError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = (),
                base: Mapping[str, Any] | None = None, **flags: Any) -> TrainConfig:
    """Recipe < task defaults < `base` (e.g. a resumed run's config) < file < flags < --set.

    `flags` are the command-line options (None = not given), `overrides` the `--set` items.
    The recipe fills the fields no layer set; `sources` says where each value came from.
    """
    base = dict(base or {})
    base_sources = base.pop("sources", None) or {}
    file_values = read_config_file(path) if path else {}
    file_values.pop("sources", None)  # a previous run's record, not a setting
    layers = [("checkpoint", base), (f"config file {path}", file_values),
              ("command line", {k: v for k, v in flags.items() if v is not None}),
              ("--set", parse_overrides(overrides))]
    task = "classification"
    for _, values in layers:
        task = values.get("task", task)
    from moat.tasks.base import get_task

    task_cls = get_task(str(task))
    layers.insert(0, ("task defaults", dict(task_cls.config_defaults)))
    config, explicit = TrainConfig(), {}
    for source, values in layers:
        config = TrainConfig.from_dict(values, config, source)
        for key in values:
            explicit[key] = base_sources.get(key, source) if source == "checkpoint" else source
            if source == "checkpoint" and explicit[key] == auto.TASK_DEFAULTS:
                explicit[key] = source  # the run's value, not re-derived from the data
    config.validate(recipe_fields=False)  # before a recipe is derived from any of it
    return apply_recipe(config, explicit, task_cls).validate()


def apply_recipe(config: TrainConfig, explicit: dict[str, str], task_cls) -> TrainConfig:
    """`config` with its recipe's values in the fields that `explicit` lacks, and `sources`."""
    name, why = recipes.choose(config.recipe, bool(config.init_from or config.pretrained),
                               bool(task_cls.config_defaults))
    needs_data = (name != "imagenet" and not set(recipes.RECIPE_FIELDS) <= explicit.keys()) \
        or not {"batch_size", "epochs"} <= auto.user_set(explicit).keys() \
        or explicit.get("img_size") == auto.TASK_DEFAULTS  # a dense task's: images' side
    task = task_cls(config) if needs_data and config.data else None
    train_size, side = (task.train_size(), task.image_side()) if task else (None, None)
    chosen = auto.before_recipe(config, explicit, name, train_size, side)  # data, machine
    config = dataclasses.replace(config, **{k: c.value for k, c in chosen.items()})
    facts = recipes.RunFacts(
        batch_size=config.batch_size, epochs=config.epochs, model=config.model,
        train_size=train_size, lr_base=config.lr_base, lr_base_batch=config.lr_base_batch)
    values, rules = recipes.resolve(name, facts, explicit)
    sources = {k: v for k, v in explicit.items() if not k.startswith("task_options.")}
    sources.update(recipe=f"{name} ({why})", **rules)
    config = dataclasses.replace(config, recipe=name, **values)
    chosen.update(auto.after_recipe(config, explicit, train_size))
    sources.update({k: c.rule for k, c in chosen.items()})
    return dataclasses.replace(config, sources=sources,
                               **{k: c.value for k, c in chosen.items()})


# --- typed assignment ------------------------------------------------------------------------

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _set(config: TrainConfig, key: str, value: Any, source: str) -> None:
    if key.startswith("task_options."):
        name = key.split(".", 1)[1]
        config.task_options[name] = parse_scalar(value) if isinstance(value, str) else value
        return
    if key not in _FIELDS:
        close = difflib.get_close_matches(key, _FIELDS, n=3)
        hint = f"; did you mean {' or '.join(close)}?" if close else \
            "; task-specific settings go under task_options (task_options.KEY=VALUE)"
        raise InvalidInputError(f"{source}: unknown setting {key!r}{hint}")
    if key == "task_options":
        if isinstance(value, str):
            value = parse_scalar(value)
        if not isinstance(value, dict):
            raise InvalidInputError(f"{source}: task_options must be a mapping, got {value!r}")
        config.task_options.update(value)
        return
    try:
        setattr(config, key, coerce(value, _HINTS[key]))
    except (TypeError, ValueError) as err:
        raise InvalidInputError(f"{source}: {key}={value!r}: {err}") from None
