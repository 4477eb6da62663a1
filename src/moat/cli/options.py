"""Argument groups of the `moat` command that several subcommands or a config dataclass
define: the training flags, derived from `TrainConfig` (one flag per field, so a new field
needs no edit here), and the options `eval` and `predict` share."""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing

# Help for the TrainConfig fields whose name does not say enough. The flags themselves come
# from TrainConfig (`add_train_options`): a new field is a new flag, without an edit here.
_TRAIN_HELP = {
    "recipe": "default settings: auto (finetune when training starts from weights, else "
              "scratch, adapted to the data and schedule), scratch, finetune, imagenet; "
              "anything you set yourself wins",
    "task": "classification (default), segmentation, ...",
    "data": "folder with train/<class>/ and val/<class>/ (or train.csv and val.csv), or the "
            "training split itself; or WebDataset shards (a brace pattern such as "
            "'s/train-{000000..000127}.tar', a folder of .tar files, a list file) or a Hugging "
            "Face dataset (save_to_disk folder, parquet, hf:NAME)",
    "val_data": "separate validation split (any form --data takes)",
    "image_key": "shards / datasets: the image member or column (default: found)",
    "label_key": "shards / datasets: the label member (cls), json field or column "
                 "(default: cls, json 'label', or a ClassLabel column)",
    "model": "variant, e.g. tiny_moat_0, moat_0 (see moat models)",
    "output": "RUN_DIR: checkpoints, logs, metrics",
    "batch_size": "GLOBAL batch: over all processes and accumulation steps",
    "accum_steps": "gradient accumulation steps",
    "lr": "peak learning rate (default: 1e-3 x batch/1024)",
    "init_from": "fine-tune from weights: RUN_DIR, .safetensors, .pt or an official "
                 "checkpoint (a new head is made for another class count)",
    "pretrained": "fine-tune from the released weights of --model (a tag such as "
                  "moat_0.in1k_224; downloaded and cached once), new head for the data",
    "layer_decay": "layer-wise lr decay, e.g. 0.75",
    "frozen_stages": "-1 none, 0 stem, K stem + stages 0..K-1",
    "precision": "auto, fp32, bf16 or fp16",
    "device": "auto, cpu, cuda, cuda:N",
    "workers": "data-loading processes per training process",
    "save_every_steps": "also checkpoint every N optimiser steps",
    "deterministic": "deterministic algorithms and seeded workers: a resumed run ends with the "
                     "same weights",
    "strict_data": "stop at the first unreadable image instead of skipping it",
    "sync_bn": "synchronise BatchNorm statistics across processes",
    "compile": "torch.compile the model",
    "grad_checkpointing": "recompute blocks in backward (less memory)",
    "channels_last": "channels-last memory format (default: on)",
    "progress": "progress bar (default: on)",
}


def train_flag(hint) -> dict | None:
    """argparse options for a TrainConfig field's type; None: settable with --set only."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if hint in (int, float, str):
        return {"type": hint}
    item_types = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and item_types and Ellipsis not in item_types \
            and len(set(item_types)) == 1 and item_types[0] in (int, float):
        return {"type": item_types[0], "nargs": len(item_types)}
    return None


def add_train_options(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (None = not given, so the config file wins)."""
    from moat.train.settings import TrainConfig  # light: dataclasses and the standard library

    p.add_argument("--config", help="YAML or JSON file of settings (see moat.train.settings)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting, e.g. --set lr=5e-4 --set mixup=0 "
                   "--set task_options.ignore_index=255 (repeatable)")
    hints = typing.get_type_hints(TrainConfig)
    names = []
    group = p.add_argument_group("settings (TrainConfig fields; lists and task_options via --set)")
    for field in dataclasses.fields(TrainConfig):
        options = train_flag(hints[field.name])
        if options is None:
            continue
        group.add_argument("--" + field.name.replace("_", "-"), dest=field.name, default=None,
                           help=_TRAIN_HELP.get(field.name), **options)
        names.append(field.name)
    p.set_defaults(train_flags=names)


def count(minimum: int, maximum: int | None = None):
    """argparse type: an integer in [minimum, maximum]; argparse names the flag in the error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
        return value
    return parse


def number(minimum: float, maximum: float | None = None, *, above: bool = False):
    """argparse type: a finite number >= `minimum` (> with `above`) and <= `maximum`."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if value < minimum or (above and value == minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {minimum:g}, "
                                             f"got {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum:g}, got {text}")
        return value
    return parse


def checkpoint_options() -> argparse.ArgumentParser:
    """The options eval and predict share: which model, which weights, where to run it."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", help="RUN_DIR, checkpoint folder or weights file")
    g.add_argument("--model", help="instead of --checkpoint: a pretrained tag with "
                   "--pretrained (e.g. moat_0.in1k_224), hf-hub:ORG/NAME or local-dir:PATH")
    g.add_argument("--pretrained", action="store_true",
                   help="the released weights of --model (downloaded and cached once)")
    g.add_argument("--weights", choices=["auto", "ema", "model"], default="auto",
                   help="auto: the better of model and EMA at that checkpoint")
    g.add_argument("--img-size", type=count(16), help="input resolution (default: training's)")
    g.add_argument("--device", default="auto")
    g.add_argument("--task", help="expected task (default: the checkpoint's)")
    return p
