"""The "segmentation" task of the training loop: DeepLabv3+ on MOAT (`model.py`), pixel-wise
cross-entropy, mIoU over the whole set (`metrics.py`), whole-image or sliding-window
inference (`sliding_window.py`), mask PNGs and overlays (`drawing.py`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from moat.data import segmentation as data
from moat.data.folders import output_names
from moat.data.images import BadImageError, load_rgb, median_short_side
from moat.data.masks import read_class_table
from moat.data.preflight import DataReport, check_segmentation
from moat.data.preprocessing import size_pair
from moat.errors import InvalidInputError
from moat.atomic import atomic_output
from moat.models.blocks import set_batch_norm_momentum
from moat.tasks.backbone import load_pretrained_backbone
from moat.tasks.base import Task, register_task
from moat.tasks.confusion import ConfusionMatrix, write_report
from moat.tasks.segmentation.demo import run_demo
from moat.tasks.segmentation.drawing import add_legend, color_palette, overlay, save_mask_png
from moat.tasks.segmentation.metrics import metrics_from_confusion
from moat.tasks.segmentation.model import deeplabv3plus
from moat.tasks.segmentation.options import SegmentationOptions
from moat.tasks.segmentation.sliding_window import segment

log = logging.getLogger("moat")

# deeplabv3plus arguments that the options may set (None there: the builder's default)
_MODEL_OPTIONS = ("output_stride", "aspp_channels", "decoder_channels", "low_level_channels",
                  "dropout", "global_attention_at_end")


@register_task
class SegmentationTask(Task):
    """Semantic segmentation: DeepLabv3+ on MOAT, pixel-wise cross-entropy, mIoU.

    TrainConfig fields used: model, data (dataset root, see `moat.data.segmentation`),
    val_data, num_classes, img_size (training crop), eval_img_size (None: evaluate at the
    original size; N: resize the shorter side to N, metrics still at the mask's size), mean,
    std, hflip, drop_path_rate, position_embedding, window_size (None: the preset's),
    pool_size, frozen_stages, grad_checkpointing, bn_momentum (whole model), init_from
    (`build_training_model`), strict_data. `task_options`: `SegmentationOptions`.
    """

    name = "segmentation"
    main_metric = "mIoU"
    options_type = SegmentationOptions
    config_defaults = {
        "img_size": 512, "pool_size": 3, "batch_size": 16, "epochs": 100, "lr": 1e-4,
        "weight_decay": 0.01, "warmup_epochs": 1.0, "min_lr": 1e-6, "label_smoothing": 0.0,
        "randaugment": None, "mixup": 0.0, "cutmix": 0.0, "ema": False,
        "bn_momentum": 0.1,  # the detection task's reason (moat.tasks.detection.task)
    }

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.options: SegmentationOptions
        self.class_names: list[str] | None = self.options.class_names
        self.found_classes: int | None = None  # the data's or a checkpoint's count
        self.class_colours: list[tuple[int, int, int]] | None = None if \
            self.options.class_colors is None else [tuple(c) for c in self.options.class_colors]
        if self.options.binary and self.class_names is None:
            self.class_names = ["background", "foreground"]
        self.confusion: Tensor | None = None  # of the last evaluate()

    # settings -------------------------------------------------------------------------
    @property
    def ignore_index(self) -> int:
        return self.options.ignore_index

    @property
    def known_classes(self) -> int | None:
        """`num_classes` when set, else the data's or a checkpoint's count, else the class
        names'; None while none of them is known."""
        return self.config.num_classes or self.found_classes or \
            (len(self.class_names) if self.class_names else None)

    @property
    def num_classes(self) -> int:
        n = self.known_classes
        if not n or int(n) < 1:
            raise InvalidInputError("segmentation needs the number of classes: set num_classes "
                                    "(150 for ADE20K), or put classes.txt (one name per line) in "
                                    "the data folder")
        return int(n)

    @property
    def crop_size(self) -> tuple[int, int]:
        return size_pair(self.config.img_size)

    def _mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return tuple(self.config.mean), tuple(self.config.std)

    # contract ---------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        c, o = self.config, self.options
        overrides = {k: getattr(o, k) for k in _MODEL_OPTIONS if getattr(o, k) is not None}
        if c.window_size is not None:
            overrides["window_size"] = c.window_size
        model = deeplabv3plus(
            c.model, self.num_classes, preset=o.preset, pool_size=int(c.pool_size),
            freeze_bn=o.freeze_bn, drop_path_rate=c.drop_path_rate,
            position_embedding=c.model_position_embedding, frozen_stages=c.frozen_stages,
            grad_checkpointing=c.grad_checkpointing, **overrides)
        set_batch_norm_momentum(model, c.bn_momentum)
        return model

    def _transforms(self):
        mean, std = self._mean_std()
        o = self.options
        train_tf = data.train_transform(
            self.crop_size, scale=tuple(o.scale_range), base_size=o.base_size,
            hflip=float(self.config.hflip), photometric=o.photometric,
            ignore_index=self.ignore_index, mean=mean, std=std)
        val_tf = data.eval_transform(self.config.eval_img_size, mean=mean, std=std)
        return train_tf, val_tf

    def _read_class_table(self, root) -> None:
        """Names and colours from the dataset's classes.json / classes.txt (options win)."""
        table = read_class_table(root)
        if table is None:
            return
        if self.class_names is None:
            self.class_names = table.names
        if self.class_colours is None and table.colours and not self.options.binary:
            self.class_colours = table.colours
        if self.class_colours and len(self.class_colours) != len(self.class_names):
            raise InvalidInputError(f"{len(self.class_colours)} class colours but "
                                    f"{len(self.class_names)} class names; give one colour per "
                                    f"class")

    def _common(self) -> dict[str, Any]:
        return dict(layout=self.options.layout, reduce_zero_label=self.options.reduce_zero_label,
                    ignore_index=self.ignore_index, strict=bool(self.config.strict_data),
                    colours=self.class_colours, binary=self.options.binary)

    def _open(self):
        root = self.config.data
        if root is None:
            raise InvalidInputError("segmentation needs a dataset folder: --data DIR (ADE20K "
                                    "layout, or images/ + masks/ folders)")
        self._read_class_table(root)
        train_tf, val_tf = self._transforms()
        train, val = data.segmentation_datasets(root, train_tf, val_tf, **self._common())
        if self.config.val_data is not None:
            val = data.segmentation_datasets(self.config.val_data, None, val_tf,
                                             **self._common())[0]
        if self.config.num_classes is None and not self.class_names:
            found = data.find_segmentation_splits(root, self.options.layout)
            if found.name == "ade20k":
                self.found_classes = data.ADE20K_CLASSES
        return train, val

    def _train_pairs(self) -> list[tuple[str, str]]:
        found = data.find_segmentation_splits(self.config.data, self.options.layout)
        return data.find_pairs(*found.train)

    def train_size(self) -> int | None:
        return len(self._train_pairs()) if self.config.data else None

    def image_side(self) -> int | None:
        return median_short_side(image for image, _ in self._train_pairs())

    def check_data(self, splits=None) -> list[DataReport]:
        """Pre-flight reports of the training and validation splits (`splits`: those opened
        already), not raised. Without num_classes or class names, the masks' largest label
        + 1 becomes num_classes."""
        train, val = splits or self._open()
        known = self.known_classes
        reports = [check_segmentation(train, known, "training", self.class_names)]
        if known is None and reports[0].notes.get("max_label") is not None \
                and not reports[0].errors:
            self.found_classes = int(reports[0].notes["max_label"]) + 1
            reports[0].facts.append(f"num_classes {self.found_classes}: the masks' largest "
                                    "label + 1 (set num_classes or write classes.txt to change)")
        if val is not None:
            reports.append(check_segmentation(val, self.known_classes, "validation",
                                              self.class_names))
        return reports

    def build_datasets(self):
        train, val = self._open()
        for report in self.check_data((train, val)):
            report.log()
            report.raise_if_errors()
        return train, val

    def build_eval_dataset(self):
        _, val_tf = self._transforms()
        self._read_class_table(self.config.data)
        found = data.find_segmentation_splits(self.config.data, self.options.layout)
        split = found.val or found.train  # a folder of images/ + masks/ is the split itself
        common = self._common()
        del common["layout"]
        if common["reduce_zero_label"] is None:
            common["reduce_zero_label"] = found.reduce_zero_label
        dataset = data.SegmentationDataset.from_folders(*split, val_tf, **common)
        report = check_segmentation(dataset, self.num_classes, "evaluation", self.class_names)
        report.log()
        report.raise_if_errors()
        return dataset

    def collate_fn(self, train: bool):
        return data.SegmentationCollate()

    def metadata(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "class_names": self.class_names,
                "ignore_index": self.ignore_index,
                "class_colors": None if self.class_colours is None else
                [list(c) for c in self.class_colours]}

    def load_metadata(self, metadata) -> None:
        if metadata.get("class_names"):
            self.class_names = list(metadata["class_names"])
        if metadata.get("class_colors"):
            self.class_colours = [tuple(c) for c in metadata["class_colors"]]
        if metadata.get("num_classes"):
            self.found_classes = int(metadata["num_classes"])

    @classmethod
    def demo(cls, output_dir: str, **options: Any) -> dict[str, Any]:
        return run_demo(output_dir, **options)

    def load_pretrained(self, model: nn.Module, path: str) -> str:
        return load_pretrained_backbone(model, path, self.backbone(model))

    def loss(self, model: nn.Module, batch: Any, device: torch.device):
        images, masks = batch[0], batch[1]
        if isinstance(images, list):
            raise InvalidInputError("training batches must have one size: use a fixed crop size")
        images = images.to(device, non_blocking=True, memory_format=self.memory_format)
        masks = masks.to(device, non_blocking=True)
        logits = model(images)
        if logits.shape[-2:] != masks.shape[-2:]:
            raise InvalidInputError(f"logits {tuple(logits.shape[-2:])} and masks "
                                    f"{tuple(masks.shape[-2:])} differ in size")
        valid = masks != self.ignore_index
        if not bool(valid.any()):  # every pixel ignored: contribute nothing, keep the graph
            return logits.sum() * 0.0, {}
        loss = F.cross_entropy(logits.float(), masks, ignore_index=self.ignore_index)
        return loss, {}

    def _inference_options(self, **overrides: Any) -> dict[str, Any]:
        o = self.options
        options = dict(mode=o.inference, flip=o.flip_test, crop_size=o.slide_crop or self.crop_size,
                       stride=o.slide_stride)
        options.update({k: v for k, v in overrides.items() if k in options and v is not None})
        return options

    @torch.no_grad()
    def evaluate_models(self, models: Mapping[str, nn.Module], loader: Any,
                        device: torch.device) -> dict[str, dict[str, float]]:
        """mIoU, pixel_acc, mAcc and IoU/<class> of each model over the whole loader (all
        processes), all run on each batch (one pass over the images); `confusion` is the
        first model's."""
        cms = {name: ConfusionMatrix(self.num_classes, self.ignore_index, device=device)
               for name in models}
        options = self._inference_options()
        for batch in loader:
            images, masks = batch[0], batch[1]
            if isinstance(images, Tensor):
                if images.numel() == 0:
                    continue
                images, masks = list(images.unbind(0)), list(masks.unbind(0))
            for group in _same_size_groups(images, masks):
                x = torch.stack([images[i] for i in group]).to(device,
                                                               memory_format=self.memory_format)
                y = torch.stack([masks[i] for i in group]).to(device)
                for name, model in models.items():
                    logits = segment(model, x, output_size=y.shape[-2:], **options)
                    cms[name].update(logits.argmax(1), y)
        results = {}
        for name in reversed(list(models)):  # the first one's confusion stays
            self.confusion = cms[name].all_reduce()
            results[name] = metrics_from_confusion(self.confusion, self.class_names)
        return {name: results[name] for name in models}

    def write_report(self, metrics, output_dir: str) -> list[str]:
        """metrics.json, per_class.csv (IoU, accuracy and labelled pixels per class; empty
        IoU for classes absent from truth and predictions) and confusion.csv (rows: truth)."""
        if self.confusion is None:
            return []
        names = self.class_names or [str(i) for i in range(self.confusion.shape[0])]
        cm = self.confusion.double()
        tp, gt, pred = cm.diag(), cm.sum(1), cm.sum(0)
        union = gt + pred - tp
        rows = [(f"{float(tp[i] / union[i]):.4f}" if union[i] > 0 else "",
                 f"{float(tp[i] / gt[i]):.4f}" if gt[i] > 0 else "", int(gt[i]))
                for i in range(len(names))]
        return write_report(output_dir, metrics, self.confusion, names,
                            "class,IoU,accuracy,pixels", rows)

    def palette(self) -> np.ndarray:
        """Colours of the classes: the dataset's colour table when it has one (so predicted
        masks look like the labels), else the PASCAL VOC pattern."""
        palette = color_palette(self.num_classes)
        if self.class_colours:
            palette[:len(self.class_colours)] = np.asarray(self.class_colours, np.uint8)
        return palette

    def format_metrics(self, metrics) -> str:
        main = {k: v for k, v in metrics.items() if not k.startswith("IoU/")}
        line = "  ".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}"
                         for k, v in main.items())
        per_class = [(k[4:], v) for k, v in metrics.items() if k.startswith("IoU/")]
        if per_class:
            line += "\nper-class IoU: " + ", ".join(f"{n} {v:.3f}" for n, v in per_class)
        return line

    @torch.no_grad()
    def predict(self, model: nn.Module, paths: Sequence[str], device: torch.device,
                output_dir: str | None = None, **options: Any) -> list[dict]:
        """Per image: `<name>_mask.png` (a palette PNG whose pixel indices are the class ids)
        and `<name>_overlay.png` (class colours blended over the image, and a legend of the
        predicted classes below it) in `output_dir`, and
        the share of pixels of each predicted class; <name> is the file's stem, made unique
        among `paths` (`moat.data.folders.output_names`). An unreadable file gives {"path",
        "error"} instead. Options: mode, flip, crop_size, stride, eval_size or img_size
        (shorter side for inference; the mask always has the image's size). Without
        `output_dir` no file is written."""
        inference = self._inference_options(**options)
        mean, std = self._mean_std()
        size = options.get("eval_size") or options.get("img_size") or self.config.eval_img_size
        transform = data.eval_transform(size, mean=mean, std=std)
        out_dir = Path(output_dir) if output_dir else None
        if out_dir:
            out_dir.mkdir(parents=True, exist_ok=True)
        names = self.class_names or [str(i) for i in range(self.num_classes)]
        results = []
        model.eval()
        for path, out_name in zip(paths, output_names(paths)):
            try:
                rgb = load_rgb(path)
            except BadImageError as err:
                results.append({"path": str(path), "error": str(err)})
                continue
            x, _ = transform(TF.pil_to_tensor(rgb), torch.zeros(1, 1, dtype=torch.long))
            logits = segment(model, x[None].to(device), output_size=(rgb.height, rgb.width),
                             **inference)
            mask = logits.argmax(1)[0].cpu().numpy()
            ids, counts = np.unique(mask, return_counts=True)
            result: dict[str, Any] = {
                "path": str(path), "height": rgb.height, "width": rgb.width,
                "classes": {names[i]: round(float(c) / mask.size, 6) for i, c in zip(ids, counts)},
            }
            if out_dir:
                mask_path = out_dir / f"{out_name}_mask.png"
                overlay_path = out_dir / f"{out_name}_overlay.png"
                save_mask_png(mask, mask_path, self.num_classes, palette=self.palette())
                present = {int(i): names[i] if i < len(names) else str(i) for i in ids}
                drawn = overlay(np.asarray(rgb), mask, self.num_classes,
                                ignore_index=self.ignore_index, palette=self.palette())
                with atomic_output(overlay_path) as tmp:  # never a half-written overlay
                    Image.fromarray(add_legend(drawn, present, self.palette())).save(
                        tmp, format="PNG")
                result |= {"mask": str(mask_path), "overlay": str(overlay_path)}
            results.append(result)
        return results


def _same_size_groups(images: list[Tensor], masks: list[Tensor]) -> list[list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, (x, y) in enumerate(zip(images, masks)):
        groups.setdefault((tuple(x.shape), tuple(y.shape)), []).append(i)
    return list(groups.values())
