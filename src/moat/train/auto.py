"""The settings a run gets from its data and its machine when nobody set them: the global
batch size, the number of epochs, the data-loading workers, and the first epoch whose
evaluation includes the EMA weights. Each comes with its rule, recorded as the recipe's values
are (config.yaml `sources:`, the train.log header); a value from the task's defaults, a config
file, a flag or `--set` always wins.

    batch_size  the largest power of two that gives >= 8 steps per epoch, within what the
                machine suits: 32 on a CPU (a CPU step costs in proportion to the batch, and
                more, smaller steps learn more per second), 128 per GPU (up to the recipes'
                1024), and at most a quarter of the memory for the activations
    epochs      imagenet recipe: its 300; otherwise enough for ~1000 optimiser steps on a CPU
                (the demo learns its 10 shapes to >= 90% in ~600), ~10000 on GPUs, within
                1..300 epochs
    workers     per training process: none on a CPU with <= 2 cores per process (the model's
                threads use them; workers would only compete), else a quarter of its cores
                (at most 4); on GPUs its cores less one, at most 8
    img_size, batch_size and epochs of a dense task (detection, segmentation), whose defaults
                are the COCO / ADE20K fine-tuning numbers (800 px, batch 16, 12 epochs):
                on a CPU the image size is at most the training images' own shorter side
                (their median, to a multiple of 32: upscaling costs compute, adds no detail)
                and the batch follows the rule above; on any machine the epochs are the
                task's or more, as many as the rule above gives for a small dataset.
                Small batches are not slower learners here: on 16 coins tiles of 96 px
                (tests/real_photos.py, tiny_moat_0, 2-core CPU) batch 2 reached box AP50
                1.0 in 150 s and AP 0.858 after its 1000 steps (1096 s); batch 4 (500
                steps, 1026 s) AP50 1.0 in 230 s and AP 0.825
    ema_eval_from_epoch
                evaluations include the EMA from the epoch by which it has made
                1 / (1 - ema_decay) updates (its averaging horizon: before that it still leans
                on the first weights and loses to the raw ones), and always at the last epoch

The machine is read once (`Machine.this()`): CPU cores this process may use, physical memory,
visible GPUs, and the processes per node under torchrun (LOCAL_WORLD_SIZE).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

# TrainConfig fields this module fills when nobody set them (in this order: the epochs
# depend on the batch size, the EMA rule on both and on the recipe's ema_decay).
AUTO_FIELDS = ("batch_size", "epochs", "workers", "ema_eval_from_epoch")

TASK_DEFAULTS = "task defaults"  # moat.train.config's name for a task's config_defaults
CPU_BATCH, GPU_BATCH, MAX_BATCH = 32, 128, 1024
CPU_STEPS, GPU_STEPS = 1000, 10000
MIN_STEPS_PER_EPOCH = 8
# Training memory per input value (3 x size^2 floats): activations kept for backward, plus
# parameters and gradients. Measured peak at 224 px, batch 4, fp32 on a CPU: MOAT-0 ~470,
# tiny_moat_0 ~160 floats per input value; the bound uses MOAT-0's.
ACTIVATION_FACTOR = 500


@dataclass(frozen=True)
class Machine:
    cores: int                 # CPU cores this process may run on
    memory: int                # bytes of physical memory
    gpus: int                  # visible CUDA devices
    processes: int = 1         # training processes on this node (torchrun)

    @classmethod
    def this(cls, device: str = "auto") -> Machine:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            (os.cpu_count() or 1)
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            memory = 8 << 30
        import torch  # here: `moat train --help` reads the config, which reads this module

        gpus = torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 0
        return cls(cores, memory, gpus, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


@dataclass(frozen=True)
class Choice:
    value: Any
    rule: str


def batch_size(train_size: int, img_size: int, machine: Machine, divisor: int = 1) -> Choice:
    """The global batch for `train_size` samples; a multiple of `divisor` (processes x
    accumulation steps)."""
    by_data = _power_of_two_at_most(max(1, train_size // MIN_STEPS_PER_EPOCH))
    per_image = 3 * img_size * img_size * 4 * ACTIVATION_FACTOR
    by_memory = _power_of_two_at_most(max(1, machine.memory // 4 // per_image))
    if machine.gpus:
        by_device = min(MAX_BATCH, GPU_BATCH * machine.gpus)
        device = f"{GPU_BATCH} per GPU x {machine.gpus}"
    else:
        by_device, device = CPU_BATCH, f"{CPU_BATCH} on a CPU"
        by_device = min(by_device, by_memory)
    value = max(1, min(by_data, by_device))
    value = max(divisor, value // divisor * divisor)
    return Choice(value, f"auto: the largest power of two with >= {MIN_STEPS_PER_EPOCH} steps "
                         f"per epoch on {train_size} samples, within {device} and a quarter of "
                         f"{machine.memory / 2**30:.0f} GiB of memory")


def epochs(train_size: int, batch: int, recipe: str, machine: Machine) -> Choice:
    if recipe == "imagenet":
        return Choice(300, "auto: the imagenet recipe's 300 epochs")
    steps_per_epoch = max(1, train_size // batch)
    target, where = (GPU_STEPS, "GPUs") if machine.gpus else (CPU_STEPS, "a CPU")
    value = min(300, max(1, math.ceil(target / steps_per_epoch)))
    return Choice(value, f"auto: ~{target} optimiser steps on {where} ({steps_per_epoch} per "
                         "epoch), within 1..300 epochs")


def workers(machine: Machine) -> Choice:
    cores = max(1, machine.cores // max(1, machine.processes))
    if machine.gpus:
        value = min(8, cores - 1)
        return Choice(max(0, value), f"auto: {cores} cores per process on GPUs, less one for "
                                     "the training process, at most 8")
    if cores <= 2:
        return Choice(0, f"auto: {cores} CPU cores per process, all for the model's threads")
    return Choice(min(4, cores // 4), f"auto: a quarter of {cores} CPU cores per process, at "
                                      "most 4")


def img_size(task_size: int, image_side: int) -> Choice:
    value = min(task_size, max(32, math.ceil(image_side / 32) * 32))
    return Choice(value, f"auto: the task's {task_size} px, at most the training images' "
                         f"shorter side ({image_side} px, median) on a CPU")


def user_set(explicit: Any) -> dict[str, str]:
    """The fields of `explicit` set by somebody, not by a task's defaults."""
    return {k: v for k, v in explicit.items() if v != TASK_DEFAULTS}


def ema_eval_from_epoch(ema_decay: float, steps_per_epoch: int | None, epochs: int) -> Choice:
    if not steps_per_epoch:
        return Choice(1, "auto: every evaluation (steps per epoch unknown)")
    horizon = 1 / max(1e-9, 1 - ema_decay)
    value = min(epochs, max(1, math.ceil(horizon / steps_per_epoch)))
    return Choice(value, f"auto: from {horizon:.0f} EMA updates (1 / (1 - ema_decay), at "
                         f"{steps_per_epoch} steps per epoch) and at the last epoch")


def _power_of_two_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def before_recipe(config: Any, explicit: Any, recipe: str, train_size: int | None,
                  image_side: int | None = None) -> dict[str, Choice]:
    """Choices for batch_size, epochs and workers where `explicit` (the fields set, and
    where) lacks them, and for a dense task's img_size, batch_size and epochs (see above);
    they need the training set's size (and the images' median shorter side)."""
    machine = Machine.this(config.device)
    out = {}
    if "workers" not in explicit:
        out["workers"] = workers(machine)
    if train_size is None:
        return out
    by_task = {k for k, v in explicit.items() if v == TASK_DEFAULTS}
    size = config.img_size
    if "img_size" in by_task and image_side and not machine.gpus and image_side < size:
        out["img_size"] = img_size(size, image_side)
        size = out["img_size"].value
    batch = config.batch_size
    if "batch_size" not in explicit or ("batch_size" in by_task and not machine.gpus):
        divisor = int(os.environ.get("WORLD_SIZE", 1)) * config.accum_steps
        out["batch_size"] = batch_size(train_size, size, machine, divisor)
        batch = out["batch_size"].value
    if "epochs" not in explicit:
        out["epochs"] = epochs(train_size, batch, recipe, machine)
    elif "epochs" in by_task:
        rule = epochs(train_size, batch, "", machine)  # steps, whatever the recipe
        if rule.value > config.epochs:
            out["epochs"] = Choice(rule.value, f"{rule.rule}; more than the task's "
                                               f"{config.epochs} on this small dataset")
    return out


def after_recipe(config: Any, explicit: Any, train_size: int | None) -> dict[str, Choice]:
    """The choice of ema_eval_from_epoch (it needs the recipe's ema_decay), if nobody set it."""
    if "ema_eval_from_epoch" in explicit or not config.ema:
        return {}
    steps = max(1, train_size // config.batch_size) if train_size else None
    return {"ema_eval_from_epoch": ema_eval_from_epoch(config.ema_decay, steps, config.epochs)}
