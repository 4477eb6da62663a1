"""A training run's parts and its progress, and the one place where a run is saved and resumed.

`Run` holds what `moat.train.assemble.assemble` builds; nothing in it is replaced while the
run trains. `Progress` is what training changes: epoch, step, position in the epoch, best
metric. A checkpoint stores the weights, the optimiser/schedule/scaler/EMA state, every
process's random generators and the progress; `save_checkpoint` writes one, `resume_point`
decides where a run starts and `restore` reads a checkpoint back.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from moat.data.bad_images import BadImageLog
from moat.tasks.base import Task
from moat.train import distributed as dist_utils
from moat.train.checkpoint import CheckpointManager, read_meta, read_state, read_weights, \
    rng_state, set_rng_state
from moat.train.config import TrainConfig
from moat.train.logger import MetricsWriter
from moat.train.optim import ModelEma, WarmupCosine
from moat.weights.catalogue import split_name
from moat.weights.hub import is_hub_name
from moat.weights.metadata import WeightsMetadata

log = logging.getLogger("moat")


@dataclass(frozen=True)
class Run:
    config: TrainConfig            # resolved: every recipe value filled in
    info: dist_utils.DistInfo
    task: Task
    model: nn.Module               # the bare model: checkpoints and evaluation
    train_model: nn.Module         # what a training step calls: the model or its DDP/compiled wrapper
    ema: ModelEma | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only
    schedule: WarmupCosine
    amp: torch.dtype | None        # autocast dtype; None: fp32
    train_loader: DataLoader
    val_loader: DataLoader | None
    steps_per_epoch: int
    checkpoints: CheckpointManager
    metrics: MetricsWriter
    bad: BadImageLog               # unreadable files skipped so far

    @property
    def device(self) -> torch.device:
        return self.info.device

    @property
    def run_dir(self) -> Path:
        return self.checkpoints.run_dir


@dataclass
class Progress:
    epoch: int = 0                 # the epoch being trained (0-based)
    step: int = 0                  # optimiser steps done
    batch_in_epoch: int = 0        # micro-batches of `epoch` already trained
    best: float | None = None      # best value of the task's main metric so far
    preferred: str = "model"       # "model" or "ema": the weights the last evaluation preferred
    last_metrics: dict[str, float] = field(default_factory=dict)
    last_checkpoint: Path | None = None
    bad_reported: int = 0          # unreadable files already reported
    samples_in_epoch: int = 0      # images of `epoch` trained on by this process (rank 0: plus
                                   # those of every process before a resume)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- resuming ----------------------------------------------------------------------------------

def resume_point(run_dir: str | Path, resume: bool) -> Path | None:
    """The checkpoint a run starts from: RUN_DIR's latest intact one with `resume` (a damaged
    latest falls back to the one before), else None. A run folder that already holds
    checkpoints is never trained over without `resume`."""
    checkpoints = CheckpointManager(run_dir)
    latest = checkpoints.latest_intact() if resume else checkpoints.latest()
    if latest is not None and not resume:
        raise ValueError(f"{run_dir} already holds checkpoints ({latest.name}); pass "
                         "--resume to continue that run, or choose another --output")
    return latest if resume else None


def stored_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The config of RUN_DIR's latest checkpoint (what a resumed run continues), or None."""
    latest = CheckpointManager(run_dir).latest_intact()
    return None if latest is None else read_meta(latest)["config"]


def restore(run: Run, checkpoint: Path) -> Progress:
    """Load `checkpoint` into the run's model, EMA, optimiser, scaler, task and random
    generators; return the progress it recorded."""
    meta = read_meta(checkpoint)
    state = read_state(checkpoint, map_location=run.device)
    run.model.load_state_dict(read_weights(checkpoint, "model")[0])
    if run.ema is not None:
        try:
            run.ema.load_state_dict(read_weights(checkpoint, "ema")[0])
        except FileNotFoundError:  # EMA switched on when resuming: start it from the model
            run.ema.load_state_dict(run.model.state_dict())
        run.ema.updates = int(state.get("ema_updates", 0))
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.task.load_metadata(meta.get("task_metadata", {}))
    progress = Progress(epoch=int(meta["epoch"]), step=int(meta["step"]),
                        batch_in_epoch=int(meta["batch_in_epoch"]), best=state.get("best"),
                        preferred=meta.get("preferred_weights", "model"),
                        last_metrics=meta.get("metrics") or {}, last_checkpoint=checkpoint,
                        samples_in_epoch=int(meta.get("samples_in_epoch", 0))
                        if run.info.is_main else 0)
    if meta.get("steps_per_epoch") != run.steps_per_epoch:
        log.warning("steps per epoch changed from %s to %d (batch size, data or processes "
                    "differ): the position in the epoch is approximate",
                    meta.get("steps_per_epoch"), run.steps_per_epoch)
    rngs = state.get("rng") or []
    if len(rngs) == run.info.world_size:
        set_rng_state(rngs[run.info.rank])
    else:
        log.warning("the checkpoint has random states of %d process(es), this run has %d: "
                    "reseeding", len(rngs), run.info.world_size)
        seed_everything(run.config.seed + run.info.rank + progress.step)
    log.info("resumed from %s: epoch %d, step %d, batch %d of the epoch", checkpoint,
             progress.epoch + 1, progress.step, progress.batch_in_epoch)
    return progress


# --- saving ------------------------------------------------------------------------------------

def weights_metadata(config: TrainConfig, task: Task) -> dict[str, str]:
    """Safetensors header: enough to rebuild the model and its preprocessing from the file."""
    meta = task.metadata()
    header = WeightsMetadata(format="moat-train", task=task.name, config=config.to_dict(),
                             task_metadata=meta)
    if "variant" in meta and not is_hub_name(meta["variant"]):  # for load_weights too
        header.variant = split_name(str(meta["variant"]))[0]
        header.position_embedding = bool(meta.get("position_embedding", True))
        header.num_classes = meta.get("num_classes")
    return header.to_header()


def save_checkpoint(run: Run, progress: Progress, epoch_done: bool,
                    metrics: dict[str, float] | None = None) -> None:
    """Write a checkpoint of the run at `progress` (rank 0; every rank must call: the random
    generators of all processes are gathered). Marks it best when `metrics` improve."""
    gathered = dist_utils.all_gather_objects((rng_state(), progress.samples_in_epoch))
    if not run.info.is_main:
        return
    rngs = [rng for rng, _ in gathered]
    epoch, batch = (progress.epoch + 1, 0) if epoch_done else \
        (progress.epoch, progress.batch_in_epoch)
    state = {"optimizer": run.optimizer.state_dict(), "schedule": run.schedule.state_dict(),
             "scaler": run.scaler.state_dict() if run.scaler else {},
             "ema_updates": run.ema.updates if run.ema else 0, "rng": rngs,
             "best": progress.best}
    meta = {"epoch": epoch, "batch_in_epoch": batch, "epoch_done": epoch_done,
            "steps_per_epoch": run.steps_per_epoch, "world_size": run.info.world_size,
            "metrics": metrics or {}, "main_metric": run.task.main_metric,
            "preferred_weights": progress.preferred, "task": run.task.name,
            "task_metadata": run.task.metadata(), "config": run.config.to_dict(),
            "bad_images": len(run.bad.paths),
            "samples_in_epoch": 0 if epoch_done else sum(n for _, n in gathered)}
    path = run.checkpoints.save(
        progress.step, model=run.model.state_dict(),
        ema=run.ema.state_dict() if run.ema else None, state=state, meta=meta,
        weights_metadata=weights_metadata(run.config, run.task))
    progress.last_checkpoint = path
    main = run.task.main_metric
    if metrics and main in metrics and (progress.best is None or metrics[main] > progress.best):
        progress.best = metrics[main]
        run.checkpoints.mark_best(path, main, progress.best, progress.preferred)
        run.checkpoints.prune()
    log.info("checkpoint %s (epoch %d, step %d)", path, epoch, progress.step)
