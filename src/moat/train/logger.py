"""What a run writes while it trains: train.log, metrics.jsonl, TensorBoard events, and
`moat plot RUN_DIR` (a PNG of the curves). Only rank 0 writes anything.

metrics.jsonl has one JSON object per line, with "event" saying what it is:
  {"event": "train", "epoch", "step", "loss", "lr", "images_per_s", "time", ...task scalars}
  {"event": "eval", "epoch", "step", "<metric>": value, "ema/<metric>": value, ...}
  {"event": "bad_images", "epoch", "step", "count", "files": [...]}
  {"event": "epoch", "epoch", "step", "train_samples", "dataset_size"}: the images the epoch
      trained on over all processes (with shards and datasets, every sample once)
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from moat.atomic import atomic_output
from moat.paths import regular_file

LOGGER_NAME = "moat"


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler writing to the current sys.stderr, not the one of its creation: a
    logger outlives the run that set it up (a notebook, a test, a program training twice),
    and the stream it found then may be replaced or closed since."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(run_dir: Path | None, is_main: bool) -> logging.Logger:
    """Logger `moat`: INFO to stderr and RUN_DIR/train.log on rank 0; errors only elsewhere."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        if getattr(handler, "_moat_run", False):
            logger.removeHandler(handler)
            handler.close()
    logger.setLevel(logging.INFO if is_main else logging.ERROR)
    logger.propagate = False
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers: list[logging.Handler] = [_StderrHandler()]
    if is_main and run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(run_dir / "train.log", encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler._moat_run = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    return logger


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Appends to RUN_DIR/metrics.jsonl and TensorBoard (RUN_DIR/tensorboard); no-op if off."""

    def __init__(self, run_dir: Path | None, enabled: bool, tensorboard: bool = True) -> None:
        self.enabled = enabled and run_dir is not None
        self.file = None
        self.tb = None
        if not self.enabled:
            return
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # tensorboard not installed: JSON lines only
                logging.getLogger(LOGGER_NAME).warning(
                    "tensorboard is not installed; writing metrics.jsonl only")

    def write(self, event: str, step: int, values: Mapping[str, Any], prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"event": event, **{k: _clean(v) for k, v in values.items()},
                  "step": step, "time": round(time.time(), 3)}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) \
                        and key not in ("epoch", "step"):
                    self.tb.add_scalar(f"{prefix or event}/{key}", value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a moat training run?")
    regular_file(path, "metrics file")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: skip it
                continue
    return records


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """PNG of training loss and lr against step, and validation metrics against epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval"]
    # A resumed run re-logs steps after its checkpoint: keep the last record of each step.
    train = list({r["step"]: r for r in train}.values())
    evals = list({r["epoch"]: r for r in evals}.values())
    output = Path(output) if output else Path(run_dir) / "curves.png"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if train:
        steps = [r["step"] for r in train]
        axes[0].plot(steps, [float(r["loss"]) for r in train])
        axes[1].plot(steps, [r["lr"] for r in train])
    axes[0].set(title="training loss", xlabel="step")
    axes[1].set(title="learning rate", xlabel="step")
    skip = {"event", "epoch", "step", "time", "images", "ema/images"}
    keys = sorted({k for r in evals for k in r if k not in skip and "loss" not in k
                   and isinstance(r[k], (int, float))})
    for key in keys:
        pts = [(r["epoch"], r[key]) for r in evals if key in r]
        axes[2].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    if keys:
        axes[2].legend()
    axes[2].set(title="validation", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_output(output) as tmp:  # the format follows the suffix, kept by tmp
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return output
