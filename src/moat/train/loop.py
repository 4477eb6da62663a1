"""The training loop, shared by every task: `train(config, resume=False)`.

    assemble (moat.train.assemble): task, data, model, EMA, optimiser, schedule, loaders,
                                    and the progress: fresh, or restored from a checkpoint
    for each epoch:
        for each optimiser step:  accum_steps micro-batches of forward (autocast), backward
                                  -> NaN check -> unscale, clip -> step -> EMA -> log
                                  -> checkpoint every save_every_steps
        evaluate (model and, once it can matter, EMA, in one pass over the validation
                  images; the better is reported and kept) -> checkpoint (+ best)

`batch_size` is global: each of the N processes sees batch_size / (N * accum_steps) images per
micro-batch. A loss (or, without a grad scaler, a gradient) that is NaN or infinite stops the
run with `NonFiniteLossError` before the optimiser step, so the last checkpoint written is
the last good one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from moat.data.bad_images import BadSample
from moat.errors import InvalidInputError, MoatError
from moat.train import distributed as dist_utils
from moat.train.assemble import assemble
from moat.train.config import load_config
from moat.train.settings import TrainConfig, read_config_file
from moat.train.loaders import readable_batch, set_epoch, track_bad
from moat.train.lock import RunLock, check_new_run_folder
from moat.train.precision import autocast
from moat.train.run import Progress, ResumeScan, Run, check_resumable, run_settings, \
    save_checkpoint

log = logging.getLogger("moat")


class NonFiniteLossError(MoatError, RuntimeError):
    """The loss or the gradient became NaN/inf; the message names the last good checkpoint."""


def train(config: TrainConfig, resume: bool = False,
          scan: ResumeScan | None = None) -> dict[str, Any]:
    """Train `config` into config.output; with `resume`, continue from its latest checkpoint
    (a fresh start if it has none; `scan`: the checkpoints found and read already).

    Returns {"metrics": last evaluation, "line": the task's summary of it, "checkpoint": last
    checkpoint folder, "run_dir", "bad_images": {path: reason} of skipped files}.
    """
    config.validate()
    if not config.output:
        raise InvalidInputError("--output RUN_DIR is required: where checkpoints and logs go")
    info = dist_utils.setup(config.device)
    try:
        # one live run per folder: a second run or a --resume of this one is refused
        if info.is_main and not resume:
            check_new_run_folder(config.output)  # never overwrite the user's own files
        with RunLock(config.output) if info.is_main else contextlib.nullcontext():
            return Trainer(*assemble(config, info, resume, scan)).fit()
    finally:
        dist_utils.cleanup()


def run_training(config_path: str | os.PathLike | None = None, overrides=(), resume: bool = False,
                 **flags: Any) -> dict[str, Any]:
    """`moat train`: build the config (file < flags < --set) and train. With `resume`, the
    run's own settings (its newest intact checkpoint's, else RUN_DIR/config.yaml) are the
    base the file and flags override; flags that change its model, task or classes are
    refused."""
    base = scan = None
    if resume:
        output = flags.get("output") or (read_config_file(config_path).get("output")
                                         if config_path else None)
        if not output:
            raise InvalidInputError("--resume needs --output RUN_DIR (the run to continue)")
        scan = ResumeScan.of(output)  # the checkpoint to resume, each file read once for all
        base = run_settings(output, scan)
    config = load_config(config_path, overrides, base=base, **flags)
    if base is not None:
        check_resumable(base, config, config.output)
    return train(config, resume=resume, scan=scan)


class Trainer:
    """The loop over a run that `assemble` built: it trains, evaluates and saves, nothing else.
    `progress` is the only state it changes."""

    def __init__(self, run: Run, progress: Progress) -> None:
        self.run, self.progress = run, progress
        self.start_step, self.start_time = progress.step, time.time()
        self.stand_in: Any = None  # the batch `_skipped_loss` runs in a distributed run

    # --- the loop --------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        r, p, c = self.run, self.progress, self.run.config
        try:
            for p.epoch in range(p.epoch, c.epochs):
                self._train_epoch()
                self._report_train_samples()
                p.batch_in_epoch = 0
                evaluate = c.eval_every_epochs and ((p.epoch + 1) % c.eval_every_epochs == 0
                                                   or p.epoch + 1 == c.epochs)
                metrics = self._evaluate() if evaluate and r.val_loader is not None else {}
                self._report_bad_images()
                save_checkpoint(r, p, epoch_done=True, metrics=metrics)
        finally:
            r.metrics.close()
            r.checkpoints.wait()  # the last checkpoint durable and in place (see its save)
        line = r.task.format_metrics(p.last_metrics) if p.last_metrics else ""
        log.info("done: %s", line or "no evaluation")
        return {"metrics": p.last_metrics, "line": line, "checkpoint": p.last_checkpoint,
                "run_dir": r.run_dir, "bad_images": dict(r.bad.paths)}

    def _train_epoch(self) -> None:
        set_epoch(self.run.train_loader, self.progress.epoch,
                  skip_batches=self.progress.batch_in_epoch)
        self.run.model.train()
        bar = self._progress_bar()
        try:
            self._train_steps(bar)
        finally:
            if bar is not None:
                bar.close()

    def _train_steps(self, bar) -> None:
        r, p, c = self.run, self.progress, self.run.config
        accum = c.accum_steps
        window = {"loss": 0.0, "n": 0, "images": 0, "t": time.time(), "scalars": {}}
        micro = 0
        for batch in track_bad(r.train_loader, r.bad):
            last_micro = (micro + 1) % accum == 0
            sync = contextlib.nullcontext() if last_micro or not r.info.distributed \
                else r.train_model.no_sync()
            with sync:
                loss, scalars = self._forward(batch)
                (r.scaler.scale(loss / accum) if r.scaler else loss / accum).backward()
            window["loss"] += loss.item() if torch.isfinite(loss) else float("nan")
            window["n"] += 1
            window["images"] += r.task.batch_size(batch)
            for k, v in scalars.items():
                window["scalars"][k] = window["scalars"].get(k, 0.0) + float(v)
            micro += 1
            p.batch_in_epoch += 1
            if not last_micro:
                continue
            lr = self._optimizer_step(window)
            if bar is not None:
                bar.update(1)
                rate = window["images"] * r.info.world_size / max(time.time() - window["t"], 1e-9)
                bar.set_postfix(loss=f"{window['loss'] / max(window['n'], 1):.4f}",
                                lr=f"{lr:.2e}", img_s=f"{rate:.1f}", run_eta=self._run_eta(),
                                refresh=False)
            if p.step % c.log_every_steps == 0:
                self._log_train(window, lr)
            step_in_epoch = p.batch_in_epoch // accum
            if c.save_every_steps and p.step % c.save_every_steps == 0 \
                    and step_in_epoch < r.steps_per_epoch:
                save_checkpoint(r, p, epoch_done=False)
            if step_in_epoch >= r.steps_per_epoch:
                break

    def _forward(self, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
        r = self.run
        size = r.task.batch_size(batch)
        # Every file of this batch was unreadable, or all but one: BatchNorm cannot normalise
        # a single image whose last feature map is 1x1 ("expected more than one value per
        # channel"), so that image is skipped with the bad ones.
        if size == 0 or (size == 1 and (getattr(batch, "bad", None) or self._padded(size))):
            return self._skipped_loss(), {}
        self.progress.samples_in_epoch += size
        with autocast(r.device, r.amp):
            loss, scalars = r.task.loss(r.train_model, batch, r.device)
        return loss, scalars

    def _padded(self, size: int) -> bool:
        """Whether a batch of `size` is short because ExactSampler padded it."""
        return size < (self.run.train_loader.batch_size or 1) and \
            getattr(self.run.train_loader.dataset.dataset, "exact_epochs", False)

    def _report_train_samples(self) -> None:
        """Log and record how many images the epoch trained on, over all processes: with
        shards and datasets, the training set's size less the skipped images."""
        r, p = self.run, self.progress
        count = torch.tensor([p.samples_in_epoch], dtype=torch.float64, device=r.device)
        dist_utils.all_reduce_sum(count)
        p.samples_in_epoch = 0
        total, size = int(count.item()), len(r.train_loader.dataset)
        log.info("epoch %d/%d: trained on %d of the %d training samples%s", p.epoch + 1,
                 r.config.epochs, total, size,
                 "" if total == size else " (the others: unreadable, in a one-image "
                 "micro-batch, or, from folders, in the incomplete last batch)")
        r.metrics.write("epoch", p.step, {"epoch": p.epoch + 1, "train_samples": total,
                                          "dataset_size": size})

    def _skipped_loss(self) -> torch.Tensor:
        """A zero loss with zero gradients, for a batch that has nothing to train on.

        Alone, a zero made from the parameters will do. In a distributed run every process
        must run the same collectives in the same order: DDP's forward (its buffer broadcast,
        SyncBatchNorm's statistics) and, when the micro-batch ends an accumulation (outside
        `no_sync`), its gradient all-reduce, which DDP starts only in the backward of an output
        of its own forward. So this process runs `stand_in`, one batch of readable training
        images, through the DDP model as any batch (the same parameters used, as
        `find_unused_parameters` expects) and multiplies its loss by 0: DDP averages the other
        processes' gradients with zeros. Those images do count in BatchNorm's statistics.
        """
        r = self.run
        if not r.info.distributed:
            return sum(p.sum() for p in r.model.parameters() if p.requires_grad) * 0.0
        if self.stand_in is None:
            self.stand_in = readable_batch(r.train_loader, self.progress.epoch)
        with autocast(r.device, r.amp):
            loss, _ = r.task.loss(r.train_model, self.stand_in, r.device)
        return loss * 0.0

    def _optimizer_step(self, window: dict) -> float:
        """NaN check, unscale + clip, step, EMA; returns the lr used."""
        r = self.run
        if dist_utils.any_true(not np.isfinite(window["loss"]), r.device):
            self._stop(f"the loss is {window['loss'] / max(window['n'], 1)}")
        lr = r.schedule.apply(r.optimizer, self.progress.step)
        params = [p for g in r.optimizer.param_groups for p in g["params"]]
        if r.scaler is not None:
            r.scaler.unscale_(r.optimizer)
        if r.config.clip_grad:
            norm = torch.nn.utils.clip_grad_norm_(params, r.config.clip_grad)
            if not torch.isfinite(norm) and r.scaler is None:
                self._stop(f"the gradient norm is {norm.item()}")
        if r.scaler is not None:
            r.scaler.step(r.optimizer)
            r.scaler.update()
        else:
            r.optimizer.step()
        r.optimizer.zero_grad(set_to_none=True)
        if r.ema is not None:
            r.ema.update(r.model)
        self.progress.step += 1
        return lr

    def _stop(self, what: str) -> None:
        p = self.progress
        last = self.run.checkpoints.latest()
        where = f"the last good checkpoint is {last}, intact" if last else \
            "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"{what} at epoch {p.epoch + 1}, step {p.step + 1} (lr "
            f"{self.run.schedule.lr(p.step):.3g}): training stopped before updating the "
            f"weights; {where}. Lower the learning rate (--set lr=...), keep gradient clipping "
            "on (clip_grad), use precision bf16 or fp32 instead of fp16, or check the data; "
            "--resume continues from the last checkpoint.")

    def _log_train(self, window: dict, lr: float) -> None:
        r, p = self.run, self.progress
        sums = torch.tensor([window["loss"], window["n"], window["images"]], dtype=torch.float64,
                            device=r.device)
        dist_utils.all_reduce_sum(sums)
        elapsed = max(time.time() - window["t"], 1e-9)
        values = {"epoch": p.epoch + p.batch_in_epoch / max(
                      r.steps_per_epoch * r.config.accum_steps, 1),
                  "loss": float(sums[0] / max(sums[1], 1)), "lr": lr,
                  "images_per_s": float(sums[2]) / elapsed}
        values.update({k: v / max(window["n"], 1) for k, v in window["scalars"].items()})
        r.metrics.write("train", p.step, values)
        window.update(loss=0.0, n=0, images=0, t=time.time(), scalars={})

    def _run_eta(self) -> str:
        """Time left for the whole run, from the speed of this session's steps so far."""
        done = self.progress.step - self.start_step
        if done <= 0:
            return "?"
        left = (time.time() - self.start_time) / done * (
            self.run.config.epochs * self.run.steps_per_epoch - self.progress.step)
        return time.strftime("%H:%M:%S", time.gmtime(left)) if left < 86400 else \
            f"{left / 86400:.1f}d"

    def _progress_bar(self):
        r, p = self.run, self.progress
        if not (r.info.is_main and r.config.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=r.steps_per_epoch, initial=p.batch_in_epoch // r.config.accum_steps,
                    desc=f"epoch {p.epoch + 1}/{r.config.epochs}", unit="step",
                    dynamic_ncols=True, leave=True)

    # --- evaluation -----------------------------------------------------------------------------
    def _evaluate(self) -> dict[str, float]:
        """Metrics of the raw weights and, with an EMA where it can matter, of the averaged
        ones, in one pass over the validation images (each decoded once, both models run on
        the same batch). The better of the two (by the task's main metric; the EMA on a tie)
        is reported, and is what the checkpoint marks as its preferred weights for eval,
        predict, export and --init-from.

        The EMA is evaluated from epoch `ema_eval_from_epoch` on (moat.train.auto: once it
        has averaged over its horizon; before, it loses to the raw weights) and always at the
        last epoch; an epoch without it prefers the raw weights."""
        r, p, c = self.run, self.progress, self.run.config
        models = {"model": r.model}
        if r.ema is not None and (c.ema_eval_from_epoch is None or p.epoch + 1 == c.epochs
                                  or p.epoch + 1 >= c.ema_eval_from_epoch):
            models["ema"] = r.ema.module
        results = self._evaluate_models(models)
        metrics = values = results["model"]
        main = r.task.main_metric
        p.preferred = "model"
        if "ema" in results:
            ema_metrics = results["ema"]
            values = {**metrics, **{f"ema/{k}": v for k, v in ema_metrics.items()}}
            if main in ema_metrics and ema_metrics[main] >= metrics.get(main, float("-inf")):
                metrics, p.preferred = ema_metrics, "ema"
        r.metrics.write("eval", p.step, {"epoch": p.epoch + 1, **values}, prefix="val")
        log.info("epoch %d/%d: %s%s", p.epoch + 1, r.config.epochs,
                 r.task.format_metrics(metrics), " (EMA weights)" if p.preferred == "ema" else "")
        p.last_metrics = metrics
        return metrics

    def _evaluate_models(self, models: dict[str, nn.Module]) -> dict[str, dict[str, float]]:
        r = self.run
        was_training = {name: model.training for name, model in models.items()}
        for model in models.values():
            model.eval()
        try:
            with torch.no_grad(), autocast(r.device, r.amp):
                return r.task.evaluate_models(models, track_bad(r.val_loader, r.bad), r.device)
        finally:
            for name, model in models.items():
                model.train(was_training[name])

    def _report_bad_images(self) -> None:
        """Gather the files every process skipped; rank 0 logs new ones and the total count."""
        r, p = self.run, self.progress
        gathered = dist_utils.all_gather_objects(dict(r.bad.paths))
        for paths in gathered[1:]:
            r.bad.add(BadSample(f, why) for f, why in paths.items() if f not in r.bad.paths)
        if len(r.bad.paths) > p.bad_reported:
            log.warning("%d unreadable image file(s) skipped so far (listed above and in "
                        "metrics.jsonl); --strict-data makes them fatal", len(r.bad.paths))
            r.metrics.write("bad_images", p.step, {
                "epoch": p.epoch + 1, "count": len(r.bad.paths),
                "files": sorted(r.bad.paths)[p.bad_reported:]})
            p.bad_reported = len(r.bad.paths)
