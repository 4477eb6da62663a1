"""The training loop, shared by every task: `train(config, resume=False)`.

    setup: process group, seeds, task, data, the task's complete model,
           EMA, optimiser, schedule, grad scaler, resume from the latest checkpoint
    for each epoch:
        for each optimiser step:  accum_steps micro-batches of forward (autocast), backward
                                  -> NaN check -> unscale, clip -> step -> EMA -> log
                                  -> checkpoint every save_every_steps
        evaluate (model and EMA) -> checkpoint (+ best) on rank 0

`batch_size` is global: each of the N processes sees batch_size / (N * accum_steps) images per
micro-batch. A loss (or, without a grad scaler, a gradient) that is NaN or infinite stops the
run with `NonFiniteLossError` before the optimiser step, so the last checkpoint written is
the last good one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from moat.data.bad_images import BadImageLog, BadSample
from moat.errors import MoatError
from moat.train import distributed as dist_utils
from moat.train.checkpoint import CheckpointManager, read_meta, read_state, read_weights, \
    rng_state, set_rng_state
from moat.train.config import TrainConfig
from moat.train.loaders import eval_loader, full_batches, set_epoch, track_bad, train_loader
from moat.train.lock import RunLock, check_new_run_folder
from moat.train.logger import MetricsWriter, setup_logging
from moat.train.optim import ModelEma, WarmupCosine, build_optimizer
from moat.train.task import Task, get_task
from moat.weights.catalogue import split_name
from moat.weights.hub import is_hub_name
from moat.weights.metadata import WeightsMetadata

log = logging.getLogger("moat")


class NonFiniteLossError(MoatError, RuntimeError):
    """The loss or the gradient became NaN/inf; the message names the last good checkpoint."""


# --- small helpers -------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only on CUDA: a few backward kernels (e.g. the bilinear resize of position tables
    # at a non-native resolution) have no deterministic CUDA version; they warn instead.
    torch.use_deterministic_algorithms(enabled, warn_only=torch.cuda.is_available())
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting (None = float32, no autocast)."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (it relies on a gradient scaler); "
                         "use bf16 or fp32 on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def count_params(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


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


# --- the run ---------------------------------------------------------------------------------------

def train(config: TrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train `config` into config.output; with `resume`, continue from its latest checkpoint
    (a fresh start if it has none).

    Returns {"metrics": last evaluation, "line": the task's summary of it, "checkpoint": last
    checkpoint folder, "run_dir", "bad_images": {path: reason} of skipped files}.
    """
    config.validate()
    if not config.output:
        raise ValueError("--output RUN_DIR is required: where checkpoints and logs go")
    info = dist_utils.setup(config.device)
    try:
        # one live run per folder: a second run or a --resume of this one is refused
        if info.is_main and not resume:
            check_new_run_folder(config.output)  # never overwrite the user's own files
        with RunLock(config.output) if info.is_main else contextlib.nullcontext():
            return _Run(config, info, resume).fit()
    finally:
        dist_utils.cleanup()


def run_training(config_path: str | os.PathLike | None = None, overrides=(), resume: bool = False,
                 **flags: Any) -> dict[str, Any]:
    """`moat train`: build the config (file < flags < --set) and train. With `resume`, the
    stored config of RUN_DIR's latest checkpoint is the base the file and flags override."""
    from moat.train.config import load_config, read_config_file

    base = None
    if resume:
        output = flags.get("output") or (read_config_file(config_path).get("output")
                                         if config_path else None)
        if not output:
            raise ValueError("--resume needs --output RUN_DIR (the run to continue)")
        latest = CheckpointManager(output).latest_intact()
        if latest is not None:
            base = read_meta(latest)["config"]
    return train(load_config(config_path, overrides, base=base, **flags), resume=resume)


class _Run:
    def __init__(self, config: TrainConfig, info: dist_utils.DistInfo, resume: bool) -> None:
        self.config, self.info, self.device = config, info, info.device
        self.run_dir = Path(config.output)
        self.is_main = info.is_main
        self.checkpoints = CheckpointManager(self.run_dir, config.keep_last)
        existing = self.checkpoints.latest_intact() if resume else self.checkpoints.latest()
        if existing is not None and not resume:
            raise ValueError(f"{self.run_dir} already holds checkpoints ({existing.name}); pass "
                             "--resume to continue that run, or choose another --output")
        self.resume_from = existing if resume else None
        setup_logging(self.run_dir, self.is_main)
        if resume and existing is None:
            log.info("--resume: no checkpoint in %s yet, starting from scratch", self.run_dir)

        if self.device.type == "cpu" and "OMP_WAIT_POLICY" not in os.environ \
                and hasattr(os, "getloadavg") and os.getloadavg()[0] > (os.cpu_count() or 1):
            log.warning("the CPU is busy (load %.1f on %d cores): spinning OpenMP threads can "
                        "make training 10x slower; start with OMP_WAIT_POLICY=PASSIVE",
                        os.getloadavg()[0], os.cpu_count() or 1)
        seed_everything(config.seed + info.rank)
        set_deterministic(config.deterministic)
        self.amp = amp_dtype(config.precision, self.device)

        # task, data, model
        self.task = get_task(config.task)(config)
        train_set, val_set = self.task.build_datasets()
        model = self.task.build_training_model(info, resume=self.resume_from is not None)
        self.model = model.to(self.device, memory_format=self.task.memory_format)
        self.ema = ModelEma(self.model, config.ema_decay) if config.ema else None
        self.optimizer = build_optimizer(self.model, config, self.task.backbone(self.model))
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None

        # loaders and schedule
        micro = self._micro_batch()
        pin = self.device.type == "cuda"
        self.train_loader = train_loader(train_set, micro, collate_fn=self.task.collate_fn(True),
                                         workers=config.workers, seed=config.seed,
                                         pin_memory=pin)
        self.val_loader = None if val_set is None or config.eval_every_epochs == 0 else \
            eval_loader(val_set, micro, collate_fn=self.task.collate_fn(False),
                        workers=min(config.workers, 2), pin_memory=pin)
        self.steps_per_epoch = full_batches(self.train_loader) // config.accum_steps
        if self.steps_per_epoch == 0:
            raise ValueError(f"the training set ({len(train_set)} samples) is smaller than one "
                             f"global batch ({config.batch_size}); lower --batch-size")
        self.schedule = WarmupCosine(
            config.peak_lr, config.epochs * self.steps_per_epoch,
            round(config.warmup_epochs * self.steps_per_epoch), config.warmup_lr, config.min_lr)

        self.bad = BadImageLog(log)
        self.bad_reported = 0
        self.epoch, self.step, self.batch_in_epoch = 0, 0, 0
        self.best: float | None = None
        self.last_metrics: dict[str, float] = {}
        self.last_checkpoint: Path | None = None
        if self.resume_from is not None:
            self._load(self.resume_from)

        self.train_model: nn.Module = self.model
        if info.distributed:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device] if self.device.type == "cuda" else None,
                find_unused_parameters=self.task.find_unused_parameters)
        if config.compile:
            self.train_model = torch.compile(self.train_model)
        self.metrics = MetricsWriter(self.run_dir, self.is_main, config.tensorboard)
        if self.is_main:
            config.save(self.run_dir / "config.yaml")
            total, trainable = count_params(self.model)
            log.info("task %s, model %s: %.2fM parameters (%.2fM trainable), %d classes",
                     config.task, config.model, total / 1e6, trainable / 1e6,
                     config.num_classes or 0)
            log.info("%d process(es) on %s, precision %s, channels_last %s; global batch %d = "
                     "%d x %d process(es) x %d accumulation step(s); %d steps/epoch, "
                     "peak lr %.3g", info.world_size, self.device,
                     {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp],
                     config.channels_last, config.batch_size, micro, info.world_size,
                     config.accum_steps, self.steps_per_epoch, config.peak_lr)

    def _micro_batch(self) -> int:
        c, n = self.config, self.info.world_size
        if c.batch_size % (n * c.accum_steps):
            raise ValueError(f"batch_size {c.batch_size} must be divisible by processes ({n}) x "
                             f"accum_steps ({c.accum_steps})")
        return c.batch_size // (n * c.accum_steps)

    # --- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        c = self.config
        self.start_step, self.start_time = self.step, time.time()
        try:
            for self.epoch in range(self.epoch, c.epochs):
                self._train_epoch()
                self.batch_in_epoch = 0
                evaluate = c.eval_every_epochs and ((self.epoch + 1) % c.eval_every_epochs == 0
                                                   or self.epoch + 1 == c.epochs)
                metrics = self._evaluate() if evaluate and self.val_loader is not None else {}
                self._report_bad_images()
                self._save(epoch_done=True, metrics=metrics)
        finally:
            self.metrics.close()
        line = self.task.format_metrics(self.last_metrics) if self.last_metrics else ""
        log.info("done: %s", line or "no evaluation")
        return {"metrics": self.last_metrics, "line": line, "checkpoint": self.last_checkpoint,
                "run_dir": self.run_dir, "bad_images": dict(self.bad.paths)}

    def _train_epoch(self) -> None:
        set_epoch(self.train_loader, self.epoch, skip_batches=self.batch_in_epoch)
        self.model.train()
        bar = self._progress_bar()
        try:
            self._train_steps(bar)
        finally:
            if bar is not None:
                bar.close()

    def _train_steps(self, bar) -> None:
        c, accum = self.config, self.config.accum_steps
        window = {"loss": 0.0, "n": 0, "images": 0, "t": time.time(), "scalars": {}}
        micro = 0
        for batch in track_bad(self.train_loader, self.bad):
            last_micro = (micro + 1) % accum == 0
            sync = contextlib.nullcontext() if last_micro or not self.info.distributed \
                else self.train_model.no_sync()
            with sync:
                loss, scalars = self._forward(batch)
                (self.scaler.scale(loss / accum) if self.scaler else loss / accum).backward()
            window["loss"] += loss.item() if torch.isfinite(loss) else float("nan")
            window["n"] += 1
            window["images"] += self.task.batch_size(batch)
            for k, v in scalars.items():
                window["scalars"][k] = window["scalars"].get(k, 0.0) + float(v)
            micro += 1
            self.batch_in_epoch += 1
            if not last_micro:
                continue
            lr = self._optimizer_step(window)
            if bar is not None:
                bar.update(1)
                rate = window["images"] * self.info.world_size / max(time.time() - window["t"], 1e-9)
                bar.set_postfix(loss=f"{window['loss'] / max(window['n'], 1):.4f}",
                                lr=f"{lr:.2e}", img_s=f"{rate:.1f}", run_eta=self._run_eta(),
                                refresh=False)
            if self.step % c.log_every_steps == 0:
                self._log_train(window, lr)
            step_in_epoch = self.batch_in_epoch // accum
            if c.save_every_steps and self.step % c.save_every_steps == 0 \
                    and step_in_epoch < self.steps_per_epoch:
                self._save(epoch_done=False)
            if step_in_epoch >= self.steps_per_epoch:
                break

    def _forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        size = self.task.batch_size(batch)
        # Every file of this batch was unreadable, or all but one: BatchNorm cannot normalise
        # a single image whose last feature map is 1x1 ("expected more than one value per
        # channel"), so that image is skipped with the bad ones.
        if size == 0 or (size == 1 and getattr(batch, "bad", None)):
            loss = sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
            return loss, {}
        with autocast(self.device, self.amp):
            loss, scalars = self.task.loss(self.train_model, batch, self.device)
        if self.config.debug_nan_step is not None and self.step + 1 == self.config.debug_nan_step:
            loss = loss * float("nan")
        return loss, scalars

    def _optimizer_step(self, window: dict) -> float:
        """NaN check, unscale + clip, step, EMA; returns the lr used."""
        c = self.config
        if dist_utils.any_true(not np.isfinite(window["loss"]), self.device):
            self._stop(f"the loss is {window['loss'] / max(window['n'], 1)}")
        lr = self.schedule.apply(self.optimizer, self.step)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if c.clip_grad:
            norm = torch.nn.utils.clip_grad_norm_(params, c.clip_grad)
            if not torch.isfinite(norm) and self.scaler is None:
                self._stop(f"the gradient norm is {norm.item()}")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return lr

    def _stop(self, what: str) -> None:
        last = self.checkpoints.latest()
        where = f"the last good checkpoint is {last}, intact" if last else \
            "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"{what} at epoch {self.epoch + 1}, step {self.step + 1} (lr "
            f"{self.schedule.lr(self.step):.3g}): training stopped before updating the weights; "
            f"{where}. Lower the learning rate (--set lr=...), keep gradient clipping on "
            "(clip_grad), use precision bf16 or fp32 instead of fp16, or check the data; "
            "--resume continues from the last checkpoint.")

    def _log_train(self, window: dict, lr: float) -> None:
        sums = torch.tensor([window["loss"], window["n"], window["images"]], dtype=torch.float64,
                            device=self.device)
        dist_utils.all_reduce_sum(sums)
        elapsed = max(time.time() - window["t"], 1e-9)
        values = {"epoch": self.epoch + self.batch_in_epoch / max(
                      self.steps_per_epoch * self.config.accum_steps, 1),
                  "loss": float(sums[0] / max(sums[1], 1)), "lr": lr,
                  "images_per_s": float(sums[2]) / elapsed}
        values.update({k: v / max(window["n"], 1) for k, v in window["scalars"].items()})
        self.metrics.write("train", self.step, values)
        window.update(loss=0.0, n=0, images=0, t=time.time(), scalars={})

    def _run_eta(self) -> str:
        """Time left for the whole run, from the speed of this session's steps so far."""
        done = self.step - self.start_step
        if done <= 0:
            return "?"
        left = (time.time() - self.start_time) / done * (
            self.config.epochs * self.steps_per_epoch - self.step)
        return time.strftime("%H:%M:%S", time.gmtime(left)) if left < 86400 else \
            f"{left / 86400:.1f}d"

    def _progress_bar(self):
        if not (self.is_main and self.config.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=self.steps_per_epoch, initial=self.batch_in_epoch // self.config.accum_steps,
                    desc=f"epoch {self.epoch + 1}/{self.config.epochs}", unit="step",
                    dynamic_ncols=True, leave=True)

    # --- evaluation -----------------------------------------------------------------------------
    def _evaluate(self) -> dict[str, float]:
        metrics = self._evaluate_model(self.model)
        values = dict(metrics)
        main = self.task.main_metric
        preferred = "model"
        if self.ema is not None:
            ema_metrics = self._evaluate_model(self.ema.module)
            values.update({f"ema/{k}": v for k, v in ema_metrics.items()})
            if main in ema_metrics and ema_metrics[main] >= metrics.get(main, float("-inf")):
                metrics, preferred = ema_metrics, "ema"
        self.preferred = preferred
        self.metrics.write("eval", self.step, {"epoch": self.epoch + 1, **values}, prefix="val")
        log.info("epoch %d/%d: %s%s", self.epoch + 1, self.config.epochs,
                 self.task.format_metrics(metrics), " (EMA weights)" if preferred == "ema" else "")
        self.last_metrics = metrics
        return metrics

    def _evaluate_model(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), autocast(self.device, self.amp):
                return self.task.evaluate(model, track_bad(self.val_loader, self.bad), self.device)
        finally:
            model.train(was_training)

    def _report_bad_images(self) -> None:
        """Gather the files every process skipped; rank 0 logs new ones and the total count."""
        gathered = dist_utils.all_gather_objects(dict(self.bad.paths))
        for paths in gathered[1:]:
            self.bad.add(BadSample(p, r) for p, r in paths.items() if p not in self.bad.paths)
        if len(self.bad.paths) > self.bad_reported:
            log.warning("%d unreadable image file(s) skipped so far (listed above and in "
                        "metrics.jsonl); --strict-data makes them fatal", len(self.bad.paths))
            self.metrics.write("bad_images", self.step, {
                "epoch": self.epoch + 1, "count": len(self.bad.paths),
                "files": sorted(self.bad.paths)[self.bad_reported:]})
            self.bad_reported = len(self.bad.paths)

    # --- checkpoints ----------------------------------------------------------------------------
    def _save(self, epoch_done: bool, metrics: dict[str, float] | None = None) -> None:
        rngs = dist_utils.all_gather_objects(rng_state())  # every process's generators
        if not self.is_main:
            return
        epoch, batch = (self.epoch + 1, 0) if epoch_done else (self.epoch, self.batch_in_epoch)
        state = {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler else {},
                 "ema_updates": self.ema.updates if self.ema else 0, "rng": rngs,
                 "best": self.best}
        meta = {"epoch": epoch, "batch_in_epoch": batch, "epoch_done": epoch_done,
                "steps_per_epoch": self.steps_per_epoch, "world_size": self.info.world_size,
                "metrics": metrics or {}, "main_metric": self.task.main_metric,
                "preferred_weights": getattr(self, "preferred", "ema" if self.ema else "model"),
                "task": self.task.name, "task_metadata": self.task.metadata(),
                "config": self.config.to_dict(), "bad_images": len(self.bad.paths)}
        path = self.checkpoints.save(
            self.step, model=self.model.state_dict(),
            ema=self.ema.state_dict() if self.ema else None, state=state, meta=meta,
            weights_metadata=weights_metadata(self.config, self.task))
        self.last_checkpoint = path
        main = self.task.main_metric
        if metrics and main in metrics and (self.best is None or metrics[main] > self.best):
            self.best = metrics[main]
            self.checkpoints.mark_best(path, main, self.best, meta["preferred_weights"])
            self.checkpoints.prune()
        log.info("checkpoint %s (epoch %d, step %d)", path, epoch, self.step)

    def _load(self, checkpoint: Path) -> None:
        meta = read_meta(checkpoint)
        state = read_state(checkpoint, map_location=self.device)
        self.model.load_state_dict(read_weights(checkpoint, "model")[0])
        if self.ema is not None:
            try:
                self.ema.load_state_dict(read_weights(checkpoint, "ema")[0])
            except FileNotFoundError:  # EMA switched on when resuming: start it from the model
                self.ema.load_state_dict(self.model.state_dict())
            self.ema.updates = int(state.get("ema_updates", 0))
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.task.load_metadata(meta.get("task_metadata", {}))
        self.epoch, self.batch_in_epoch = int(meta["epoch"]), int(meta["batch_in_epoch"])
        self.step, self.best = int(meta["step"]), state.get("best")
        self.last_metrics = meta.get("metrics") or {}
        self.last_checkpoint = checkpoint
        if meta.get("steps_per_epoch") != self.steps_per_epoch:
            log.warning("steps per epoch changed from %s to %d (batch size, data or processes "
                        "differ): the position in the epoch is approximate",
                        meta.get("steps_per_epoch"), self.steps_per_epoch)
        rngs = state.get("rng") or []
        if len(rngs) == self.info.world_size:
            set_rng_state(rngs[self.info.rank])
        else:
            log.warning("the checkpoint has random states of %d process(es), this run has %d: "
                        "reseeding", len(rngs), self.info.world_size)
            seed_everything(self.config.seed + self.info.rank + self.step)
        log.info("resumed from %s: epoch %d, step %d, batch %d of the epoch", checkpoint,
                 self.epoch + 1, self.step, self.batch_in_epoch)
