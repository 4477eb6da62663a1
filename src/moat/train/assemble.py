"""`assemble`: everything a training run needs, built in one function that reads top to bottom.

    where it starts -> logging, seeds, precision -> task, data, model -> EMA, optimiser,
    scaler -> loaders, schedule -> progress (fresh, or restored from the checkpoint)
    -> DDP / compile wrappers -> metrics files, config.yaml, the log's header
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from moat.data.bad_images import BadImageLog
from moat.device import configure_device, pins_memory
from moat.errors import InvalidInputError
from moat.tasks.base import get_task
from moat.train import distributed as dist_utils
from moat.train.auto import AUTO_FIELDS
from moat.train.checkpoint import CheckpointManager
from moat.train.settings import TrainConfig, micro_batch
from moat.train.loaders import eval_loader, full_batches, train_loader
from moat.train.logger import MetricsWriter, setup_logging
from moat.train.optim import ModelEma, WarmupCosine, build_optimizer
from moat.train.precision import amp_dtype, grad_scaler, precision_name
from moat.train.recipes import RECIPE_FIELDS
from moat.train.run import Progress, ResumeScan, Run, restore, resume_point, seed_everything

log = logging.getLogger("moat")


def assemble(config: TrainConfig, info: dist_utils.DistInfo, resume: bool,
             scan: ResumeScan | None = None) -> tuple[Run, Progress]:
    """The run of `config` on this process, and where its training starts (`scan`: the
    checkpoints --resume found, already read; see `resume_point`)."""
    run_dir = Path(config.output)
    setup_logging(run_dir, info.is_main)  # first: the checkpoint fallback's warning is logged
    start = resume_point(run_dir, resume, scan)  # None: a fresh run
    if resume and start is None:
        log.info("--resume: no checkpoint in %s yet, starting from scratch", run_dir)
    _warn_if_cpu_busy(info.device)
    seed_everything(config.seed + info.rank)
    amp = amp_dtype(config.precision, info.device)
    # TF32 only where a mixed precision already rounds more: precision fp32 means float32
    configure_device(info.device, tf32=amp is not None, deterministic=config.deterministic)

    # the task builds the data, then the model (which may depend on the data's classes)
    task = get_task(config.task)(config)
    train_set, val_set = task.build_datasets()
    config.num_classes = task.num_classes  # what the data says, in the run's config.yaml
    model = task.build_training_model(info, resume=start is not None)  # complete: weights,
    model = model.to(info.device, memory_format=task.memory_format)  # BN, freezing, SyncBN
    ema = ModelEma(model, config.ema_decay) if config.ema else None
    optimizer = build_optimizer(model, config, task.backbone(model))
    scaler = grad_scaler(amp, info.device)

    micro = micro_batch(config.batch_size, config.accum_steps, info.world_size)
    pin = pins_memory(info.device)
    train_batches = train_loader(train_set, micro, collate_fn=task.collate_fn(True),
                                 workers=config.workers, seed=config.seed, pin_memory=pin,
                                 accum_steps=config.accum_steps)
    # Evaluation keeps no activations for backward: twice the training batch fits in the
    # memory training needs, and runs with fewer per-batch overheads.
    val_batches = None if val_set is None or config.eval_every_epochs == 0 else \
        eval_loader(val_set, 2 * micro, collate_fn=task.collate_fn(False),
                    workers=min(config.workers, 2), pin_memory=pin)
    steps_per_epoch = full_batches(train_batches) // config.accum_steps
    if steps_per_epoch == 0:
        raise InvalidInputError(f"the training set ({len(train_set)} samples) is smaller than one "
                                f"global batch ({config.batch_size}); lower --batch-size")
    schedule = WarmupCosine(config.peak_lr, config.epochs * steps_per_epoch,
                            round(config.warmup_epochs * steps_per_epoch), config.warmup_lr,
                            config.min_lr)

    train_model: nn.Module = model
    if info.distributed:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device] if info.device.type == "cuda" else None,
            find_unused_parameters=task.find_unused_parameters)
    if config.compile:
        train_model = torch.compile(train_model)
    run = Run(config=config, info=info, task=task, model=model, train_model=train_model,
              ema=ema, optimizer=optimizer, scaler=scaler, schedule=schedule, amp=amp,
              train_loader=train_batches, val_loader=val_batches,
              steps_per_epoch=steps_per_epoch,
              checkpoints=CheckpointManager(run_dir, config.keep_last),
              metrics=MetricsWriter(run_dir, info.is_main, config.tensorboard),
              bad=BadImageLog(log))
    try:
        progress = restore(run, start) if start is not None else \
            Progress(preferred="ema" if ema is not None else "model")
    except BaseException:  # e.g. a damaged state.pt: no open metrics file left behind
        run.metrics.close()
        raise

    if info.is_main:
        config.save(run_dir / "config.yaml")
        _log_header(run, micro)
    return run, progress


def _warn_if_cpu_busy(device: torch.device) -> None:
    if device.type == "cpu" and "OMP_WAIT_POLICY" not in os.environ \
            and hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1):
        log.warning("the CPU is busy (load %.1f on %d cores): spinning OpenMP threads can "
                    "make training 10x slower; start with OMP_WAIT_POLICY=PASSIVE",
                    os.getloadavg()[0], os.cpu_count() or 1)


def _log_header(run: Run, micro: int) -> None:
    c, info = run.config, run.info
    total = sum(p.numel() for p in run.model.parameters())
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    log.info("task %s, model %s: %.2fM parameters (%.2fM trainable), %d classes",
             c.task, c.model, total / 1e6, trainable / 1e6, c.num_classes or 0)
    log.info("%d process(es) on %s, precision %s, channels_last %s; global batch %d = "
             "%d x %d process(es) x %d accumulation step(s); %d steps/epoch, peak lr %.3g",
             info.world_size, info.device, precision_name(run.amp), c.channels_last,
             c.batch_size, micro, info.world_size, c.accum_steps, run.steps_per_epoch,
             c.peak_lr)
    log.info("recipe %s; the settings it owns (value: the rule or the place that set it):",
             c.sources.get("recipe", c.recipe))
    for name in RECIPE_FIELDS:
        log.info("  %-16s %-14s %s", name, getattr(c, name), c.sources.get(name, "default"))
    chosen = [name for name in AUTO_FIELDS if c.sources.get(name, "").startswith("auto")]
    if chosen:
        log.info("chosen from the data and this machine, as nobody set them (set them to "
                 "override; moat.train.auto):")
    for name in chosen:
        log.info("  %-19s %-11s %s", name, getattr(c, name), c.sources[name])
