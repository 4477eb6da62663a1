"""`moat eval` and `moat predict` as library functions: load a task and its model from a
checkpoint (a run directory, a checkpoint folder or a weights file), then evaluate a dataset
or predict images.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moat.data.folders import describe_skipped, walk_files
from moat.data.images import IMAGE_SUFFIXES
from moat.device import configure_device, pick_device, pins_memory
from moat.errors import InvalidInputError
from moat.export.onnx_metadata import OnnxMetadata
from moat.atomic import atomic_write_text
from moat.integrity import read_safetensors
from moat.tasks.base import Task, get_task
from moat.train.checkpoint import resolve_checkpoint
from moat.train.checkpoint_folder import file_metadata, is_complete, read_meta, read_weights
from moat.train.settings import TrainConfig
from moat.weights.loader import load_weights

log = logging.getLogger("moat")


_CONFIG_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def with_settings(config: TrainConfig, settings: Mapping[str, Any] | None,
                  source: str = "settings") -> TrainConfig:
    """`config` with `settings` (None: keep the stored value), converted to each field's type
    and validated like any setting."""
    values = {k: v for k, v in (settings or {}).items() if v is not None}
    return TrainConfig.from_dict(values, config, source).validate() if values else config


def config_from_dict(values: Mapping[str, Any]) -> TrainConfig:
    """A stored config; settings this version does not know are dropped with a warning."""
    unknown = sorted(set(values) - _CONFIG_FIELDS)
    if unknown:
        log.warning("ignoring settings unknown to this version: %s", unknown)
    return TrainConfig.from_dict({k: v for k, v in values.items() if k in _CONFIG_FIELDS})


def onnx_metadata(task: Task) -> tuple[dict[str, str], dict[str, Any]]:
    """(metadata_props, preprocessing) that let `moat eval` rebuild `task` from an ONNX file."""
    c = task.config
    props = OnnxMetadata(config=c.to_dict(), task_metadata=task.metadata()).props()
    return props, dict(crop_pct=c.crop_pct, interpolation=c.interpolation, mean=list(c.mean),
                       std=list(c.std))


def _load_onnx(path: Path, settings: Mapping[str, Any]) -> tuple[Task, nn.Module, dict]:
    """The task of an ONNX file exported from a run, and the file as an ONNX Runtime model."""
    from moat.export.ort import OnnxRuntimeModel

    meta = OnnxMetadata.read(path)
    if meta.config is None:
        raise InvalidInputError(f"{path} does not record its task and classes: export it "
                                "from the training run, `moat export onnx RUN_DIR OUT.onnx`")
    config = with_settings(config_from_dict(meta.config), settings)
    task = get_task(config.task)(config)
    task.load_metadata(meta.task_metadata)
    return task, OnnxRuntimeModel(path), {"checkpoint": str(path), "weights": "onnxruntime"}


def load_task_and_model(checkpoint: str | os.PathLike, *, weights: str = "auto",
                        device: torch.device | str = "cpu",
                        settings: Mapping[str, Any] | None = None,
                        ) -> tuple[Task, nn.Module, dict[str, Any]]:
    """(task, model in eval mode on `device`, info) from a run dir, checkpoint dir or file.

    `settings` override the stored config (e.g. data, eval_img_size, strict_data).
    Files without a stored config (converted official weights) need the `variant` metadata
    that `moat convert` writes. An `.onnx` file exported from a run (`moat export onnx
    RUN_DIR`) gives its task and an `OnnxRuntimeModel` (CPU) instead.
    """
    path = resolve_checkpoint(checkpoint)
    device = torch.device(device)
    if path.suffix == ".onnx":  # evaluated by ONNX Runtime, on the CPU
        return _load_onnx(path, settings or {})
    if path.is_dir():
        meta = read_meta(path)
        config, task_meta = config_from_dict(meta["config"]), meta.get("task_metadata", {})
        state, which = read_weights(path, weights)
        info = {"checkpoint": str(path), "weights": which, "step": meta.get("step"),
                "epoch": meta.get("epoch")}
    else:
        header = file_metadata(path)
        if header.config is not None:
            config = config_from_dict(header.config)
            task_meta = dict(header.task_metadata or {})
        elif header.variant:  # converted official weights, a saved hub folder's weights
            recorded = dict(model=header.variant, position_embedding=header.position_embedding,
                            num_classes=header.num_classes, mean=header.mean, std=header.std,
                            crop_pct=header.crop_pct, interpolation=header.interpolation,
                            img_size=header.native_resolution)
            recorded.update({k: v for k, v in (header.model_args or {}).items()
                             if k in _CONFIG_FIELDS})  # a saved folder's layout
            config = with_settings(TrainConfig(), recorded, f"{path}'s header")
            task_meta = {"classes": list(header.label_names)} if header.label_names else {}
        else:
            raise InvalidInputError(f"{path}: no model description in the file (neither a moat "
                                    "training checkpoint nor converted weights with a 'variant'); "
                                    "pass the run directory instead")
        state, which = None, "file"
        info = {"checkpoint": str(path), "weights": which}
    config = with_settings(config, settings)
    task = get_task(config.task)(config)
    task.load_metadata(task_meta)
    model = task.build_model()
    if state is not None:
        model.load_state_dict(state)
    elif file_metadata(path).config is not None:
        model.load_state_dict(read_safetensors(path)[0])
    else:
        load_weights(model, path)
    # the training run's memory format: the same arithmetic, so the same predictions
    model.to(device, memory_format=task.memory_format).eval()
    return task, model, info


def _report_dir(path: Path) -> Path:
    """RUN_DIR/eval for checkpoints inside a run, else <file folder>/eval-<name>; where that
    cannot be written (a read-only folder, someone else's run), ./eval-<name> instead."""
    if path.is_dir() and is_complete(path) and path.parent.name == "checkpoints":
        preferred, name = path.parent.parent / "eval", f"eval-{path.parent.parent.name}"
    else:
        preferred, name = path.parent / f"eval-{path.stem}", f"eval-{path.stem}"
    if _writable(preferred):
        return preferred
    fallback = Path.cwd() / name
    log.warning("cannot write the report to %s: writing it to %s instead (--report chooses)",
                preferred, fallback)
    return fallback


def _writable(folder: Path) -> bool:
    """Whether `folder` exists writable, or can be created (its nearest existing parent is)."""
    while not folder.exists():
        if folder.parent == folder:
            return False
        folder = folder.parent
    return folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)


def evaluate_checkpoint(checkpoint: str | os.PathLike, data: str | os.PathLike, *,
                        img_size: int | None = None, batch_size: int = 64, workers: int = 2,
                        weights: str = "auto", device: str = "auto", precision: str = "fp32",
                        report_dir: str | os.PathLike | None = None, strict_data: bool = False,
                        task: str | None = None) -> dict[str, Any]:
    """Metrics of a checkpoint on `data` (a split folder/CSV, or a root with val/).

    Returns {"metrics", "line" (the task's one-line summary), "report" (files written),
    "bad_images" (skipped files), "checkpoint", "weights"}. Works under torchrun too.
    """
    from moat.data.bad_images import BadImageLog
    from moat.train import distributed as dist_utils
    from moat.train.loaders import eval_loader, track_bad
    from moat.train.precision import amp_dtype, autocast

    info = dist_utils.setup(device)
    amp = amp_dtype(precision, info.device)
    configure_device(info.device, tf32=amp is not None)  # fp32 means float32 (no TF32)
    try:
        settings = {"data": str(data), "strict_data": strict_data, "eval_img_size": img_size}
        expected = task
        task, model, ckpt = load_task_and_model(checkpoint, weights=weights, device=info.device,
                                                settings=settings)
        if expected and expected != task.name:
            raise InvalidInputError(f"{checkpoint} is a {task.name!r} checkpoint, not {expected!r}")
        dataset = task.build_eval_dataset()
        loader = eval_loader(dataset, batch_size, collate_fn=task.collate_fn(False),
                             workers=workers, pin_memory=pins_memory(info.device))
        bad = BadImageLog(log)
        with torch.no_grad(), autocast(info.device, amp):
            metrics = task.evaluate(model, track_bad(loader, bad), info.device)
        report: list[str] = []
        if info.is_main:
            out = Path(report_dir) if report_dir else _report_dir(Path(ckpt["checkpoint"]))
            report = task.write_report(metrics, str(out))
        return {"metrics": metrics, "line": task.format_metrics(metrics), "report": report,
                "bad_images": dict(bad.paths), "task": task, **ckpt}
    finally:
        dist_utils.cleanup()


def expand_images(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Files as given; folders replaced by the image files under them (sorted)."""
    out: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():  # safely: no loops, no links out of the folder, regular files only
            files, skipped = walk_files(p, IMAGE_SUFFIXES)
            if skipped:
                log.warning("skipped under %s: %s", p, describe_skipped(skipped))
            out += files
        else:
            out.append(str(p))
    if not out:
        raise InvalidInputError("no images to predict")
    return out


def predict_checkpoint(images: Sequence[str | os.PathLike], checkpoint: str | os.PathLike, *,
                       top_k: int = 5, img_size: int | None = None, weights: str = "auto",
                       device: str = "auto", json_path: str | os.PathLike | None = None,
                       output_dir: str | os.PathLike | None = None,
                       task: str | None = None,
                       annotations: str | os.PathLike | None = None) -> list[dict]:
    """The task's predictions for image files (and folders of them), optionally as JSON.
    `annotations`: a COCO file whose image ids a detector's results carry."""
    dev = pick_device(device)
    expected = task
    task, model, _ = load_task_and_model(checkpoint, weights=weights, device=dev)
    if expected and expected != task.name:
        raise InvalidInputError(f"{checkpoint} is a {task.name!r} checkpoint, not {expected!r}")
    if annotations and task.name != "detection":
        raise InvalidInputError(f"--annotations gives a detector's results COCO image ids; "
                                f"{checkpoint} is a {task.name!r} checkpoint: leave it out")
    results = task.predict(model, expand_images(images), dev,
                           output_dir=str(output_dir) if output_dir else None,
                           top_k=top_k, img_size=img_size, annotations=annotations)
    if json_path:
        text = json.dumps(results, indent=1) + "\n"
        if str(json_path) == "-":
            print(text, end="")
        else:
            atomic_write_text(json_path, text)
    return results
