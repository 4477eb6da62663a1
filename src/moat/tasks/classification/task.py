"""Image classification: the "classification" task of the training loop, and `moat demo`.

Data: an image folder (`train/<class>/*`, `val/<class>/*`) or CSV file lists (`train.csv`,
`val.csv` with `path,label`), read by `moat.data.classification` (bad files are skipped and
reported, or fatal with strict_data). Training: RandomResizedCrop + flip + RandAugment,
Mixup/CutMix with label smoothing folded into the soft targets (moat.data.transforms).
Metrics: top-1, top-5 (percent), loss, and a confusion matrix summed over processes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import moat
from moat.data.checks import check_classification_splits, check_readable
from moat.data.classification import SkipBadCollate
from moat.data.sources import classification_datasets, eval_dataset
from moat.data.images import BadImageError, load_rgb
from moat.data.transforms import eval_transform, mixup_cutmix, train_transform
from moat.device import to_device
from moat.errors import InvalidInputError
from moat.models.blocks import set_batch_norm_momentum
from moat.tasks.base import Task, register_task
from moat.tasks.classification.demo import run_demo
from moat.tasks.confusion import ConfusionMatrix, class_recall, plot_confusion, write_report
from moat.tasks.options import TaskOptions
from moat.train.distributed import all_reduce_sum


@register_task
class ClassificationTask(Task):
    name = "classification"
    main_metric = "top-1"
    options_type = TaskOptions  # no task_options: every setting is a TrainConfig field

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.classes: list[str] | None = None
        self.confusion: torch.Tensor | None = None  # of the last evaluate()

    @property
    def num_classes(self) -> int:
        """`num_classes` when set, else the number of classes in the data (or checkpoint)."""
        n = self.config.num_classes or (len(self.classes) if self.classes else None)
        if n is None:
            raise InvalidInputError("num_classes is unknown: build the datasets first or set it")
        return n

    # --- data ----------------------------------------------------------------------------------
    def _transforms(self):
        c = self.config
        train_tf = train_transform(
            c.img_size, mean=tuple(c.mean), std=tuple(c.std), interpolation=c.interpolation,
            scale=tuple(c.scale), hflip=c.hflip,
            randaugment=tuple(c.randaugment) if c.randaugment else None,
            random_erasing=c.random_erasing)
        return train_tf, self.eval_transform()

    def eval_transform(self, img_size: int | None = None):
        c = self.config
        return eval_transform(img_size or c.eval_img_size or c.img_size, mean=tuple(c.mean),
                              std=tuple(c.std), interpolation=c.interpolation,
                              crop_pct=c.crop_pct)

    def build_datasets(self):
        c = self.config
        if not c.data:
            raise InvalidInputError("classification needs --data: a folder with train/<class>/ and "
                                    "val/<class>/ (or train.csv and val.csv), or a training split")
        train_tf, val_tf = self._transforms()
        train, val = classification_datasets(c.data, c.val_data, train_transform=train_tf,
                                             val_transform=val_tf, strict=c.strict_data,
                                             **self._keys())
        check_classification_splits(train, val)  # refuse data that cannot train, now
        self._set_classes(train.classes)
        return train, val

    def train_size(self) -> int:
        return len(classification_datasets(self.config.data, self.config.val_data,
                                           **self._keys())[0])

    def build_eval_dataset(self):
        dataset = eval_dataset(self.config.data, self.eval_transform(), self.classes,
                               self.config.strict_data, **self._keys())
        check_readable(dataset, "evaluation")
        return dataset

    def _keys(self) -> dict[str, str | None]:
        return {"image_key": getattr(self.config, "image_key", None),
                "label_key": getattr(self.config, "label_key", None)}

    def _set_classes(self, classes: Sequence[str]) -> None:
        c = self.config
        if c.num_classes is not None and c.num_classes != len(classes):
            raise InvalidInputError(f"num_classes is {c.num_classes} but the data has "
                                    f"{len(classes)} classes ({', '.join(list(classes)[:5])}...); drop "
                                    f"num_classes or fix the data")
        if self.classes is not None and list(self.classes) != list(classes):
            raise InvalidInputError("the data's classes differ from the checkpoint's: "
                                    f"{list(classes)[:5]}... vs {list(self.classes)[:5]}...")
        self.classes = list(classes)

    def collate_fn(self, train: bool):
        if not train:
            return SkipBadCollate()
        c = self.config
        return SkipBadCollate(mixup_cutmix(self.num_classes, c.mixup, c.cutmix,
                                           c.label_smoothing))

    # --- model and loss -------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        c = self.config
        pe = {} if c.position_embedding is None else {"position_embedding": c.position_embedding}
        model = moat.create_model(
            c.model, num_classes=self.num_classes, window_size=c.window_size, pool_size=c.pool_size,
            drop_path_rate=c.drop_path_rate, **pe)
        set_batch_norm_momentum(model, c.bn_momentum)
        model.freeze_stages(c.frozen_stages)
        model.set_grad_checkpointing(c.grad_checkpointing)
        return model

    def loss(self, model: nn.Module, batch: Any, device: torch.device):
        images = to_device(batch[0], device, self.memory_format)
        targets = to_device(batch[1], device)
        logits = model(images)
        if targets.ndim == 2:  # soft targets from Mixup/CutMix, smoothing already folded in
            loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            return loss, {}
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.config.label_smoothing)
        acc = (logits.argmax(-1) == targets).float().mean().item() * 100
        return loss, {"train_top1": acc}

    # --- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate_models(self, models: Mapping[str, nn.Module], loader: Any,
                        device: torch.device) -> dict[str, dict[str, float]]:
        """top-1, top-5, loss, mean per-class accuracy of each model, all run on each batch
        (one pass over the images); `confusion` is the first model's."""
        k = self.num_classes
        # bincount runs on the CPU: its CUDA kernel is not deterministic (--deterministic).
        confusions = {name: ConfusionMatrix(k, ignore_index=None) for name in models}
        # loss, top-5 hits, count
        sums = {name: torch.zeros(3, dtype=torch.float64, device=device) for name in models}
        for batch in loader:
            images, targets = batch[0], batch[1]
            if len(targets) == 0:
                continue
            images = to_device(images, device, self.memory_format)
            targets = to_device(targets, device)
            for name, model in models.items():
                logits = model(images).float()
                sums[name][0] += F.cross_entropy(logits, targets, reduction="sum").double()
                top = logits.topk(min(5, k), dim=-1).indices
                sums[name][1] += (top == targets[:, None]).any(-1).sum()
                sums[name][2] += len(targets)
                confusions[name].update(top[:, 0].cpu(), targets.cpu())
        results = {}
        for name in reversed(list(models)):  # the first one's confusion stays
            self.confusion = confusions[name].all_reduce(device)
            all_reduce_sum(sums[name])
            n = max(float(sums[name][2]), 1.0)
            present = [a for a in self.per_class_accuracy() if not math.isnan(a)]
            results[name] = {
                "top-1": float(self.confusion.diag().sum()) / n * 100,
                "top-5": float(sums[name][1]) / n * 100, "loss": float(sums[name][0]) / n,
                "mean-class-acc": sum(present) / max(len(present), 1),
                "images": int(sums[name][2])}
        return {name: results[name] for name in models}

    def per_class_accuracy(self) -> list[float]:
        """Accuracy (percent) of each class in the last evaluation; NaN for a class without
        images."""
        return [] if self.confusion is None else [a * 100 for a in class_recall(self.confusion)]

    def format_metrics(self, metrics: Mapping[str, float]) -> str:
        line = f"top-1: {metrics['top-1']:.2f}%  top-5: {metrics['top-5']:.2f}%"
        if "loss" in metrics:
            line += f"  loss: {metrics['loss']:.4f}"
        if "mean-class-acc" in metrics:
            line += f"  mean per-class: {metrics['mean-class-acc']:.2f}%"
        if "images" in metrics:
            line += f"  ({int(metrics['images'])} images)"
        return line

    def write_report(self, metrics: Mapping[str, Any], output_dir: str) -> list[str]:
        """metrics.json, per_class.csv (accuracy in percent and count per class),
        confusion.csv and confusion.png."""
        if self.confusion is None:
            return []
        names = self.classes or [str(i) for i in range(self.confusion.shape[0])]
        rows = [("" if math.isnan(a) else f"{a:.2f}", t) for a, t in
                zip(self.per_class_accuracy(), self.confusion.sum(1).tolist())]
        paths = write_report(output_dir, metrics, self.confusion, names,
                             "class,accuracy,images", rows)
        png = plot_confusion(self.confusion, names, Path(output_dir) / "confusion.png")
        return paths + ([png] if png else [])

    # --- prediction ------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, model: nn.Module, paths: Sequence[str], device: torch.device,
                output_dir: str | None = None, top_k: int = 5, img_size: int | None = None,
                batch_size: int = 32, **options: Any) -> list[dict]:
        """[{"path", "top_k": [{"label", "index", "probability"}, ...]}] per image; an
        unreadable file gives {"path", "error"} instead."""
        names = self.classes or [str(i) for i in range(self.num_classes)]
        transform = self.eval_transform(img_size)
        k = max(1, min(top_k, len(names)))
        model.eval()
        results: list[dict] = [{} for _ in paths]
        good: list[tuple[int, torch.Tensor]] = []
        for i, path in enumerate(paths):
            try:
                good.append((i, transform(load_rgb(path))))
            except BadImageError as err:
                results[i] = {"path": str(path), "error": str(err)}
        for start in range(0, len(good), batch_size):
            chunk = good[start:start + batch_size]
            x = torch.stack([t for _, t in chunk]).to(device, memory_format=self.memory_format)
            probs = model(x).float().softmax(-1).cpu()
            values, indices = probs.topk(k, dim=-1)
            for (i, _), v, idx in zip(chunk, values.tolist(), indices.tolist()):
                results[i] = {"path": str(paths[i]), "top_k": [
                    {"label": names[j], "index": j, "probability": round(p, 6)}
                    for p, j in zip(v, idx)]}
        return results

    # --- checkpoint metadata ------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        c = self.config
        return {"classes": self.classes, "variant": c.model,
                "position_embedding": c.model_position_embedding, "num_classes": self.num_classes,
                "img_size": c.eval_img_size or c.img_size, "mean": list(c.mean),
                "std": list(c.std), "interpolation": c.interpolation, "crop_pct": c.crop_pct}

    def load_metadata(self, metadata: Mapping[str, Any]) -> None:
        classes = metadata.get("classes")
        if classes:
            self.classes = list(classes)

    # --- demo ------------------------------------------------------------------------------------
    @classmethod
    def demo(cls, output_dir: str, **options: Any) -> dict[str, Any]:
        return run_demo(output_dir, **options)
