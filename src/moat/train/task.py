"""The contract between the shared training loop and a task (classification, segmentation,
detection). The loop owns everything common: devices, distributed setup, mixed precision,
the optimiser and schedule, EMA, checkpoints, logging, resumption. A task owns what differs:
its model, data, loss, metrics and predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset


class Task:
    """Base class; subclasses are registered in `TASKS` by name (`--task NAME`)."""

    name: str = ""
    main_metric: str = ""  # key of `evaluate`'s result; higher is better; picks the best checkpoint

    def __init__(self, config: Any) -> None:
        self.config = config

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        """(train, val) datasets from the config's data location."""
        raise NotImplementedError

    def collate_fn(self, train: bool) -> Callable | None:
        return None

    def loss(self, model: nn.Module, batch: Any, device: torch.device) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward one training batch; return the loss and scalars worth logging."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        """Metrics over the whole validation set, reduced across processes when distributed."""
        raise NotImplementedError

    def predict(self, model: nn.Module, paths: Sequence[str], device: torch.device,
                output_dir: str | None = None, **options: Any) -> list[dict]:
        """One JSON-serialisable result per input image; may write files to output_dir."""
        raise NotImplementedError


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls
    return cls
