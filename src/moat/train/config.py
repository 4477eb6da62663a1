"""A run's settings, resolved in one place: `load_config` layers them, lowest first, as

    the recipe (moat.train.recipes: `imagenet`, `scratch`, `finetune`; `auto` picks one for
    the run) < the task's `config_defaults` < a resumed run's own settings < the config file
    < command-line flags < `--set KEY=VALUE`.

The recipe only fills what nobody set; it, and the values `moat.train.auto` chooses from the
data and the machine, follow the training set's size, which the run's task counts. `sources`
records, for every value the recipe owns and every value set explicitly, the rule or the
place it came from (config.yaml and train.log show it).

One way: this module asks the task (`moat.tasks`), and the task reads the settings
(`TrainConfig`, `moat.train.settings`, whose names are importable here too).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import Any

from moat.tasks.base import get_task
from moat.train import auto, recipes
from moat.train.settings import TrainConfig, parse_overrides, read_config_file


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
