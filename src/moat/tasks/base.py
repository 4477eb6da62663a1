"""The contract between the shared training loop and a task (classification, segmentation,
detection). The loop owns everything common: devices, distributed setup, mixed precision,
the optimiser and schedule, EMA, checkpoints, logging, resumption. A task owns what differs:
its model, data, loss, metrics and predictions.

Order of calls in `moat train`: `moat.train.assemble` calls `Task(config)`,
`build_datasets()`, then `build_training_model(info, resume)` (so the model may use what the
data found, e.g. `num_classes`, which the run records in its config), and
`moat.train.loop` per step `loss(...)` under autocast, per epoch `evaluate_models(...)` under
autocast and no_grad on every rank (each sees a shard; the model and its EMA in one pass),
and `metadata()` whenever a checkpoint is written. A batch may carry `.bad` (a list of
`moat.data.bad_images.BadSample`): the loop
logs those files; a training batch whose `batch_size()` is 0 (or 1 with bad files) adds no
gradient: in a distributed run that process calls `loss(...)` on a batch of readable training
images instead and multiplies it by 0, so that it takes part in DDP's collectives (see
`Trainer._skipped_loss`). `moat eval` / `moat predict` rebuild the task from the config stored
in the checkpoint, call `load_metadata(...)` and `build_model()`: the same model, complete.

Task-specific settings are `config.task_options` (`--set task_options.KEY=VALUE`), checked and
typed by the task's `options_type` into `task.options` (unknown keys are refused).
Everything below `predict` is optional: the defaults work for any model containing a MoatNet.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from moat.errors import InvalidInputError
import moat.tasks
from moat.data.preflight import DataReport, dataset_report
from moat.models.moat import MoatNet
from moat.train import distributed as dist_utils
from moat.train.finetune import load_pretrained
from moat.weights.loader import weights_file

log = logging.getLogger("moat")


class Task:
    """Base class; subclasses are registered in `TASKS` by name (`--task NAME`)."""

    name: str = ""
    main_metric: str = ""  # key of `evaluate`'s result; higher is better; picks the best checkpoint
    # The typed `task_options` (a `moat.tasks.options.TaskOptions` dataclass): `self.options`.
    options_type: type | None = None

    def __init__(self, config: Any) -> None:
        self.config = config
        self.options = None if self.options_type is None else \
            self.options_type.from_dict(getattr(config, "task_options", None), self.name)

    def build_model(self) -> nn.Module:
        """The complete model the config describes: architecture, BatchNorm momentum
        (`bn_momentum`), frozen stages (`MoatNet.freeze_stages`) and gradient checkpointing.
        Nothing changes it afterwards; `moat eval` / `moat predict` load weights into it."""
        raise NotImplementedError

    def build_training_model(self, info: dist_utils.DistInfo, resume: bool) -> nn.Module:
        """`build_model()` plus what only training adds: the `init_from` weights or, with
        `pretrained`, the release of `model` (unless the run resumes from its own checkpoint)
        and SyncBatchNorm when `sync_bn` and distributed."""
        model = self.build_model()
        start = self.config.init_from or (self.config.pretrained and
                                          weights_file(self.config.model, pretrained=True))
        if start and not resume:
            log.info("%s", self.load_pretrained(model, str(start)))
        if self.config.sync_bn and info.distributed:
            model = dist_utils.convert_sync_batchnorm(model, info.device)
        return model

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
        if type(self).evaluate_models is Task.evaluate_models:
            raise NotImplementedError(f"task {self.name!r} implements neither evaluate nor "
                                      "evaluate_models")
        return self.evaluate_models({"model": model}, loader, device)["model"]

    @torch.no_grad()
    def evaluate_models(self, models: Mapping[str, nn.Module], loader: Any,
                        device: torch.device) -> dict[str, dict[str, float]]:
        """{name: `evaluate`'s metrics} of several models (the training loop: the raw weights
        and the EMA). Tasks override it to run every model on each batch in one pass over
        `loader`, so each image is read and transformed once; this default makes one pass per
        model (the loop's loader can be iterated again)."""
        if type(self).evaluate is Task.evaluate:
            raise NotImplementedError(f"task {self.name!r} implements neither evaluate nor "
                                      "evaluate_models")
        return {name: self.evaluate(model, loader, device) for name, model in models.items()}

    def predict(self, model: nn.Module, paths: Sequence[str], device: torch.device,
                output_dir: str | None = None, **options: Any) -> list[dict]:
        """One JSON-serialisable result per input image; may write files to output_dir."""
        raise NotImplementedError

    # --- optional: defaults suit any model that contains a MoatNet ---------------------------

    # TrainConfig fields this task sets differently from the classification recipe, applied
    # before the config file and the command line, e.g. {"mixup": 0.0, "cutmix": 0.0}.
    config_defaults: Mapping[str, Any] = {}

    # DistributedDataParallel(find_unused_parameters=...): True if some parameters may get no
    # gradient in a step (e.g. a branch that only runs for some batches).
    find_unused_parameters: bool = False

    @property
    def memory_format(self) -> torch.memory_format:
        """The model's memory format (config.channels_last): inputs should be moved with it
        (`x.to(device, memory_format=self.memory_format)`); ignoring it is correct, only slower."""
        return torch.channels_last if self.config.channels_last else torch.contiguous_format

    def train_size(self) -> int | None:
        """The number of training samples, counted before the run is assembled (the recipe
        adapts to the schedule's length, moat.train.recipes); None: unknown."""
        return None

    def image_side(self) -> int | None:
        """The training images' median shorter side in pixels, if the task's default image
        size may follow it (`moat.train.auto`); None: unknown or not needed."""
        return None

    def check_data(self) -> list[DataReport]:
        """The pre-flight reports of the config's data (`moat data check`): what it holds,
        warnings and errors, not raised. Default: open the datasets (`build_datasets` refuses
        what cannot train) and count their samples."""
        return [dataset_report(*self.build_datasets())]

    def build_eval_dataset(self) -> Dataset:
        """The dataset `moat eval --data DIR` measures (config.data = DIR). Default: the
        validation set of `build_datasets()`."""
        val = self.build_datasets()[1]
        if val is None:
            raise InvalidInputError(f"no validation data found in "
                                    f"{getattr(self.config, 'data', None)!r}")
        return val

    def batch_size(self, batch: Any) -> int:
        """Number of samples in a batch (images/s, empty-batch detection). Default: the length
        of the batch's first element (a tensor or a list)."""
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        if isinstance(first, torch.Tensor):
            return int(first.shape[0]) if first.ndim else 1
        return len(first)

    @property
    def num_classes(self) -> int:
        """Classes the model predicts: `config.num_classes` when set, else what the data (or
        a checkpoint's metadata) says. Tasks never write the config: the run records this
        value in its config.yaml once the datasets are built (`moat.train.assemble`)."""
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable facts stored in every checkpoint (e.g. class names)."""
        return {}

    def load_metadata(self, metadata: Mapping[str, Any]) -> None:
        """Receive `metadata()` back when a checkpoint is loaded for eval/predict/resume."""

    def backbone(self, model: nn.Module) -> nn.Module | None:
        """The MoatNet inside `model` (for frozen stages, layer-wise lr decay, gradient
        checkpointing and `--init-from`). Default: the first MoatNet submodule."""
        return next((m for m in model.modules() if isinstance(m, MoatNet)), None)

    def load_pretrained(self, model: nn.Module, path: str) -> str:
        """`--init-from PATH`: load weights for fine-tuning; return a one-line summary.
        Default: into `backbone(model)`, skipping tensors whose shape differs (e.g. a head
        with another number of classes); see `moat.train.finetune.load_pretrained`."""
        return load_pretrained(model, path, backbone=self.backbone(model))

    def format_metrics(self, metrics: Mapping[str, float]) -> str:
        """One human-readable line; `moat eval` prints it."""
        return "  ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}"
                         for k, v in metrics.items())

    def write_report(self, metrics: Mapping[str, Any], output_dir: str) -> list[str]:
        """Extra files after `moat eval` (plots, tables); return their paths. Default: none."""
        return []

    @classmethod
    def demo(cls, output_dir: str, **options: Any) -> dict[str, Any]:
        """`moat demo --task NAME`: generate data, train, evaluate, predict, all under
        output_dir. Return {"outputs": {label: path}, "metrics": {...}, "summary": "line"}."""
        raise NotImplementedError(f"task {cls.name!r} has no demo")


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> type[Task]:
    """The task registered as `name`, importing `moat.tasks.*` modules to find it."""
    if name not in TASKS:
        errors = _import_task_modules()
        if name not in TASKS:
            hint = "".join(f"\n  (importing {m} failed: {e})" for m, e in errors.items())
            raise InvalidInputError(f"unknown task {name!r}; available: {sorted(TASKS)}{hint}")
    return TASKS[name]


def _import_task_modules() -> dict[str, str]:
    errors = {}
    for info in pkgutil.iter_modules(moat.tasks.__path__, "moat.tasks."):
        try:
            importlib.import_module(info.name)
        except ImportError as err:  # an optional dependency may be missing
            errors[info.name] = f"{type(err).__name__}: {err}"
    return errors
