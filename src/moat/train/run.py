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
from moat.errors import InvalidInputError
from moat.tasks.base import Task
from moat.train import distributed as dist_utils
from moat.train.checkpoint import CheckpointManager
from moat.train.checkpoint_folder import MODEL_FILE, Checkpoint
from moat.train.settings import TrainConfig, read_config_file
from moat.train.logger import MetricsWriter
from moat.train.optim import ModelEma, WarmupCosine
from moat.train.rng import rng_state, set_rng_state
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

# Settings a resumed run cannot change: the checkpoint's weights and optimiser state are
# shaped by them (classes are compared separately, in `restore`).
RUN_IDENTITY = ("task", "model", "num_classes", "position_embedding", "window_size",
                "pool_size", "optimizer")


@dataclass(frozen=True)
class ResumeScan:
    """What --resume finds in a run folder: its newest intact checkpoint, every file read and
    verified once and held until `restore` loads it (None: none), the newer damaged ones, and
    the checkpoint folders seen (a folder that changed since is scanned again)."""
    run_dir: Path
    checkpoint: Checkpoint | None
    damaged: dict[Path, str]
    folders: tuple[str, ...]

    @classmethod
    def of(cls, run_dir: str | Path) -> ResumeScan:
        manager = CheckpointManager(run_dir)
        folders = tuple(p.name for p in manager.folders())
        intact, damaged = manager.newest_intact(warn=False)
        return cls(Path(run_dir), intact, damaged, folders)

    def current(self, run_dir: str | Path) -> bool:
        """Whether this scan still describes RUN_DIR's checkpoints."""
        return Path(run_dir).resolve() == self.run_dir.resolve() and self.folders == tuple(
            p.name for p in CheckpointManager(run_dir).folders())


def resume_point(run_dir: str | Path, resume: bool,
                 scan: ResumeScan | None = None) -> Checkpoint | None:
    """The checkpoint a run starts from: RUN_DIR's newest intact one with `resume` (from
    `scan` if it is current: its files are not read again), else None.

    Damaged newer checkpoints are moved aside to checkpoints/damaged/ (named in the log), so
    that the resumed run never saves over them; a run folder whose checkpoints are all damaged
    is refused (see `check_resumable`). A folder that already holds checkpoints, intact or
    not, is never trained over without `resume`."""
    checkpoints = CheckpointManager(run_dir)
    if not resume:
        existing = checkpoints.folders()
        if existing:
            raise InvalidInputError(f"{run_dir} already holds checkpoints ({existing[0].name}); "
                                    "pass --resume to continue that run, or choose another "
                                    "--output")
        return None
    if scan is None or not scan.current(run_dir):
        scan = ResumeScan.of(run_dir)
    intact, damaged = scan.checkpoint, scan.damaged
    if intact is None and damaged:
        raise InvalidInputError(_nothing_intact(run_dir, damaged))
    for path, reason in damaged.items():
        kept = checkpoints.set_aside(path)
        log.warning("checkpoint %s is damaged (%s): moved aside to %s (kept, never deleted); "
                    "resuming from %s", path.name, reason, kept, intact.path.name)
    return intact


def run_settings(run_dir: str | Path, scan: ResumeScan | None = None) -> dict[str, Any] | None:
    """The settings of the run in RUN_DIR, which `--resume` continues: those of its newest
    intact checkpoint (`scan`, made here if None), else its config.yaml (a run stopped before
    its first checkpoint), else None (nothing there yet). A run whose checkpoints are all
    damaged is refused."""
    run_dir = Path(run_dir)
    scan = scan if scan is not None else ResumeScan.of(run_dir)
    if scan.checkpoint is not None:
        meta = scan.checkpoint.meta
        settings = dict(meta["config"])
        classes = meta.get("task_metadata", {}).get("classes")
        if classes and settings.get("num_classes") == len(classes):
            del settings["num_classes"]  # the data's count: `restore` compares the names
        return settings
    if scan.damaged:
        raise InvalidInputError(_nothing_intact(run_dir, scan.damaged))
    saved = run_dir / "config.yaml"
    if saved.exists():
        return read_config_file(saved)
    return None


def check_resumable(stored: dict[str, Any], config: TrainConfig, run_dir: str | Path) -> None:
    """Refuse a --resume that changes what the run's checkpoint is shaped by."""
    wanted = config.to_dict()
    changed = [f"{key}: the run has {stored.get(key)!r}, this command asks {wanted[key]!r}"
               for key in RUN_IDENTITY if key in stored
               and _normal(stored.get(key)) != _normal(wanted[key])]
    if changed:
        raise InvalidInputError(
            f"--resume of {run_dir}: " + "; ".join(changed) + ". A resumed run keeps its "
            "model, task and classes: drop the flags that change them to continue it, or "
            f"start a new run with another --output (add --init-from {run_dir} to start "
            "from its weights)")


def _normal(value: Any) -> Any:
    return [_normal(v) for v in value] if isinstance(value, (list, tuple)) else value


def _nothing_intact(run_dir: str | Path, damaged: dict[Path, str]) -> str:
    listed = "; ".join(f"{path.name}: {reason}" for path, reason in damaged.items())
    return (f"--resume of {run_dir}: no intact checkpoint to continue from ({listed}). "
            "Nothing was changed. To start over, run without --resume and with another "
            f"--output; to recover, restore the damaged file from a backup, or fine-tune from "
            f"the weights that are still readable with --init-from "
            f"{next(iter(damaged))}/{MODEL_FILE}")


def restore(run: Run, checkpoint: Checkpoint) -> Progress:
    """Load `checkpoint` (its files verified on the bytes loaded, each read once) into the
    run's model, EMA, optimiser, scaler, task and random generators, then drop the bytes it
    held; return the progress it recorded."""
    meta = checkpoint.meta
    stored = meta.get("task_metadata", {}).get("classes")
    classes = run.task.metadata().get("classes")
    if stored and classes and list(stored) != list(classes):
        added, gone = sorted(set(classes) - set(stored)), sorted(set(stored) - set(classes))
        raise InvalidInputError(
            f"--resume of {run.run_dir}: the data's classes differ from the run's ("
            + (f"new: {', '.join(added[:5])}; " if added else "")
            + (f"missing: {', '.join(gone[:5])}; " if gone else "")
            + ("same names in another order; " if not added and not gone else "")
            + f"the run has {len(stored)}, the data {len(classes)}). Resume with the run's "
            f"data, or start a new run with another --output (--init-from {run.run_dir} to "
            "start from its weights)")
    state = checkpoint.state(map_location=run.device)
    try:
        run.model.load_state_dict(checkpoint.weights("model")[0])
    except RuntimeError as err:  # a model built from other settings than the run's
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), "")
        raise InvalidInputError(
            f"--resume of {run.run_dir}: {checkpoint.path.name} holds another model than the one "
            f"this command builds ({first}); resume with the run's own settings, or start a "
            "new run with another --output") from None
    if run.ema is not None:
        try:
            run.ema.load_state_dict(checkpoint.weights("ema")[0])
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
                        last_metrics=meta.get("metrics") or {},
                        last_checkpoint=checkpoint.path,
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
    checkpoint.release()
    log.info("resumed from %s: epoch %d, step %d, batch %d of the epoch", checkpoint.path,
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
        weights_metadata=weights_metadata(run.config, run.task), background=True)
    progress.last_checkpoint = path
    main = run.task.main_metric
    if metrics and main in metrics and (progress.best is None or metrics[main] > progress.best):
        progress.best = metrics[main]
        run.checkpoints.mark_best(path, main, progress.best, progress.preferred)
    log.info("checkpoint %s (epoch %d, step %d)", path, epoch, progress.step)
