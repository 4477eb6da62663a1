"""The "detection" task of the training loop: COCO-format data (`moat.data.coco`), the
detectors' own losses (`model.py`), COCO box (and mask) AP computed once on rank 0 over the
detections of every process (`metrics.py`), drawn predictions (`drawing.py`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from moat.data.coco import (CocoDetection, collate_detection, detections_to_coco,
                            eval_transforms, image_ids_for, load_coco, prepare_coco, read_json,
                            train_transforms)
from moat.data.folders import output_names
from moat.data.images import BadImageError, load_rgb
from moat.data.preflight import DataReport, check_detection
from moat.data.yolo import SPLIT_NAMES, find_yolo_split, read_yolo_names, yolo_to_coco
from moat.errors import InvalidInputError
from moat.atomic import atomic_output, atomic_write_text
from moat.models.blocks import set_batch_norm_momentum
from moat.tasks.backbone import load_pretrained_backbone
from moat.tasks.base import Task, register_task
from moat.tasks.confusion import csv_cell
from moat.tasks.detection.demo import run_detection_demo
from moat.tasks.detection.drawing import draw_detections
from moat.tasks.detection.metrics import coco_dataset, coco_metrics
from moat.tasks.detection.model import area_scaled, build_detector
from moat.tasks.detection.options import DETECTOR_OPTIONS, DetectionOptions

log = logging.getLogger("moat")


class DetectionSplit(NamedTuple):
    """A split's image folder and its annotations as a COCO dict (read, not yet prepared)."""

    images: Path
    annotations: dict
    source: str  # the file or folder the annotations came from


def _find_split(root: Path, split: str) -> DetectionSplit:
    """A split of a detection dataset folder, in the first layout found:

    * COCO: annotations/instances_<name>.json with images in root/<name> or
      root/images/<name>, where <name> starts with the split ("train", "train2017", ...);
    * a COCO JSON per split folder (Roboflow's export): <split>/_annotations.coco.json
      (or annotations.json) next to the images (split "val" also as "valid");
    * YOLO text labels (`moat.data.yolo`): images/<split> + labels/<split>,
      <split>/images + <split>/labels, or one images/ + labels/ pair.
    """
    for ann in sorted((root / "annotations").glob(f"instances_{split}*.json")):
        name = ann.stem[len("instances_"):]
        for folder in (root / name, root / "images" / name):
            if folder.is_dir():
                return DetectionSplit(folder, read_json(ann), str(ann))
    for name in SPLIT_NAMES.get(split, (split,)):
        for file_name in ("_annotations.coco.json", "annotations.json"):
            ann = root / name / file_name
            if ann.is_file():
                return DetectionSplit(ann.parent, read_json(ann), str(ann))
    found = find_yolo_split(root, split)
    if found is not None:
        names = read_yolo_names(root, found[1])
        return DetectionSplit(found[0], yolo_to_coco(*found, names), str(found[1]))
    raise FileNotFoundError(
        f"no detection {split!r} split under {str(root)!r}: expected COCO's layout "
        f"(annotations/instances_{split}*.json with images in a folder of the same name, e.g. "
        f"annotations/instances_{split}2017.json + {split}2017/), {split}/_annotations.coco.json "
        f"beside the images, or YOLO labels (images/{split} + labels/{split}, and classes.txt); "
        f"or set task_options {split}_images / {split}_annotations")


@register_task
class DetectionTask(Task):
    """COCO-style detection / instance segmentation.

    Config fields used: model (backbone variant), data (a COCO-layout folder:
    annotations/instances_<split>*.json + images in <split>*/), img_size (the shorter side
    images are trained and evaluated at; default 800), eval_img_size (evaluation shorter side,
    default img_size), hflip, bn_momentum, frozen_stages, grad_checkpointing, drop_path_rate.
    `task_options`: `DetectionOptions`.
    """

    name = "detection"
    main_metric = "AP"
    options_type = DetectionOptions
    # Common COCO fine-tuning practice for attention backbones (Swin / ConvNeXt Cascade Mask
    # R-CNN "1x": AdamW 1e-4, wd 0.05, batch 16, 12 epochs, multi-scale + flip); the MOAT
    # paper's schedule is not available (docs/model_zoo.md).
    config_defaults: Mapping[str, Any] = {
        "img_size": 800, "epochs": 12, "batch_size": 16, "lr": 1e-4, "min_lr": 1e-6,
        "weight_decay": 0.05, "warmup_epochs": 0.1, "clip_grad": None, "ema": False,
        "label_smoothing": 0.0, "randaugment": None, "mixup": 0.0, "cutmix": 0.0,
        "pool_size": 3,  # the detection preset's (official downstream setting)
        # PyTorch's (and mmdetection's / mmsegmentation's) BatchNorm momentum: the official
        # 0.01 keeps 45% of the initial statistics for evaluation after 80 steps, 74% after
        # 30 (tests/test_user_data.py's 30-step segmentation: mIoU 0.33-0.41 over 3 seeds
        # with 0.01, 0.76-0.77 with 0.1)
        "bn_momentum": 0.1,
    }

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.options: DetectionOptions
        self.classes: list[str] | None = self.options.class_names
        self.label_to_category: dict[int, int] | None = None
        self._eval_dataset = None
        self._splits: dict[str, DetectionSplit] = {}

    @property
    def arch(self) -> str:
        return self.options.arch

    @property
    def with_masks(self) -> bool:
        return self.arch.endswith("mask_rcnn")

    @property
    def num_classes(self) -> int:
        if self.classes:
            return len(self.classes)
        if not self.config.num_classes:
            raise InvalidInputError("detection needs the class names: build the datasets first, or "
                                    "load a checkpoint (its metadata has them)")
        return int(self.config.num_classes)

    @property
    def min_size(self) -> int:
        return int(self.options.min_size or self.config.img_size)

    @property
    def max_size(self) -> int:
        return int(self.options.max_size or round(self.min_size * 1333 / 800))

    # --- contract -----------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        c, o = self.config, self.options
        extra = {k: getattr(o, k) for k in DETECTOR_OPTIONS if getattr(o, k) is not None}
        extra["pool_size"] = int(c.pool_size)  # TrainConfig's: the task has no second copy
        if c.window_size is not None:
            extra["window_size"] = c.window_size
        min_size = int(c.eval_img_size or self.min_size)
        # the heads' per-image counts follow the image area (`area_scaled`) unless set
        extra.setdefault("box_batch_size_per_image", area_scaled(512, self.min_size, 64))
        extra.setdefault("rpn_post_nms_top_n_test", area_scaled(1000, min_size, 300))
        max_size = self.max_size if not c.eval_img_size else round(self.max_size * min_size
                                                                   / self.min_size)
        model = build_detector(
            self.arch, c.model, self.num_classes, min_size=min_size, max_size=max_size,
            preset=o.preset, frozen_stages=c.frozen_stages, freeze_bn=o.freeze_bn,
            grad_checkpointing=c.grad_checkpointing, drop_path_rate=c.drop_path_rate,
            weights=o.weights, **extra)
        set_batch_norm_momentum(model, c.bn_momentum)
        return model

    def _split(self, split: str) -> DetectionSplit:
        """A split, read once per task (`prepare_coco` copies what it changes)."""
        if split not in self._splits:
            self._splits[split] = self._read_split(split)
        return self._splits[split]

    def _read_split(self, split: str) -> DetectionSplit:
        images, anns = getattr(self.options, f"{split}_images"), \
            getattr(self.options, f"{split}_annotations")
        if images and anns:
            return DetectionSplit(Path(images), read_json(anns), str(anns))
        if self.config.data is None:
            raise InvalidInputError("detection needs a dataset folder (data: COCO JSON or YOLO "
                                    f"labels) or task_options {split}_images + {split}_annotations")
        return _find_split(Path(self.config.data), split)

    def train_size(self) -> int | None:
        return len(self._split("train").annotations.get("images", [])) if self.config.data \
            else None

    def image_side(self) -> int | None:
        """From the training annotations' image sizes (COCO's width and height; YOLO's read
        from the images)."""
        images = self._split("train").annotations.get("images", [])
        sides = [min(i["width"], i["height"]) for i in images if i.get("width") and i.get("height")]
        return int(np.median(sides)) if sides else None

    def _checked_split(self, split: str) -> tuple[Path, Any, DataReport]:
        """(image folder, prepared pycocotools COCO, pre-flight report) of a split."""
        found = self._split(split)
        data, notes = prepare_coco(found.annotations, self.options.box_format, found.images)
        coco = load_coco(data, copy_dict=False)
        name = {"train": "training", "val": "validation"}[split]
        report = check_detection(coco, found.images, name, [f"from {found.source}", *notes])
        return found.images, coco, report

    def check_data(self) -> list[DataReport]:
        """The pre-flight reports of the training and validation splits (not raised)."""
        return [self._checked_split(split)[2] for split in ("train", "val")]

    def _set_classes(self, dataset) -> None:
        if self.classes and list(self.classes) != dataset.classes:
            raise InvalidInputError(f"the dataset's categories {dataset.classes} differ from the "
                                    f"configured ones {list(self.classes)}")
        self.classes = dataset.classes
        self.label_to_category = dict(dataset.label_to_category)

    def _box_only(self, report: DataReport) -> None:
        """A dataset without instance masks trains the box-only form of a mask detector."""
        if self.with_masks and not report.notes.get("with_masks"):
            box_arch = self.arch.replace("mask_rcnn", "rcnn")
            log.warning("the training annotations have boxes but no masks: training %s "
                        "instead of %s", box_arch, self.arch)
            self.options.arch = box_arch
            self.config.task_options = {**dict(self.config.task_options or {}),
                                        "arch": box_arch}

    def build_datasets(self):
        o = self.options
        tf = train_transforms(self.min_size, self.max_size, scale_range=tuple(o.scale_range),
                              jitter=o.jitter, hflip=float(self.config.hflip))
        images, coco, report = self._checked_split("train")
        report.log()
        report.raise_if_errors()
        self._box_only(report)
        train = CocoDetection(images, coco, tf, train=True, masks=self.with_masks,
                              skip_empty=o.skip_empty)
        self._set_classes(train)
        val = self.build_eval_dataset()
        if val.classes != train.classes:
            raise InvalidInputError(f"train and val categories differ: {train.classes} vs "
                                    f"{val.classes}")
        if Path(val.image_dir) == Path(images):
            log.warning("no validation split found: evaluating on the training images "
                        "(add images/val + labels/val, or a val/ folder)")
        return train, val

    def build_eval_dataset(self):
        images, coco, report = self._checked_split("val")
        report.log()
        report.raise_if_errors()
        val = CocoDetection(images, coco, eval_transforms(), masks=False)
        if self.classes is None:
            self._set_classes(val)
        self._eval_dataset = val
        return val

    def collate_fn(self, train: bool):
        return collate_detection

    def batch_size(self, batch: Any) -> int:
        return len(batch[0])

    @staticmethod
    def _to_device(batch: Any, device: torch.device):
        images, targets = batch
        images = [img.to(device, non_blocking=True) for img in images]
        targets = [{k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v
                    for k, v in t.items()} for t in targets]
        return images, targets

    def loss(self, model: nn.Module, batch: Any, device: torch.device):
        images, targets = self._to_device(batch, device)
        losses = model(images, targets)
        total = sum(losses.values())
        return total, {k: float(v.detach()) for k, v in losses.items()}

    @torch.no_grad()
    def evaluate_models(self, models: Mapping[str, nn.Module], loader: Any,
                        device: torch.device) -> dict[str, dict[str, float]]:
        """COCO metrics of each model, all run on each batch (one pass over the images)."""
        dataset = getattr(loader, "dataset", None)  # the loop passes a tracking iterable
        dataset = coco_dataset(self._eval_dataset if dataset is None else dataset)
        was_training = {name: model.training for name, model in models.items()}
        for model in models.values():
            model.eval()
        per_image: dict[str, dict[int, list[dict]]] = {name: {} for name in models}
        for batch in loader:
            images, targets = self._to_device(batch, device)
            if not images:
                continue
            for name, model in models.items():
                for output, target in zip(model(images), targets):
                    image_id = int(target["image_id"])
                    per_image[name][image_id] = detections_to_coco(
                        output, image_id, dataset.label_to_category)
        for name, model in models.items():
            model.train(was_training[name])
        return {name: coco_metrics(per_image[name], dataset.coco, self.with_masks)
                for name in models}

    @torch.no_grad()
    def predict(self, model: nn.Module, paths: Sequence[str], device: torch.device,
                output_dir: str | None = None, **options: Any) -> list[dict]:
        """Per image: detections (category name and id, score, COCO bbox [x, y, w, h], and
        an RLE mask with a mask head); with `output_dir`, `<name>_detections.png` (boxes,
        labels, scores, masks drawn for scores >= score_threshold), <name> being the file's
        stem made unique among `paths` (`moat.data.folders.output_names`), and one
        `detections.json` of every image (COCO's results format, every detection: what
        pycocotools' `COCO.loadRes` reads). Image ids: those of the COCO file
        `options["annotations"]` (matched by file name), else 1..N in the order of `paths`.
        An unreadable file gives {"path", "error"} instead."""
        threshold = float(options.get("score_threshold") or self.options.score_threshold)
        if options.get("img_size"):  # a different inference size than the checkpoint's
            transform = model.transform
            ratio = transform.max_size / transform.min_size[0]
            transform.min_size = (int(options["img_size"]),)
            transform.max_size = round(int(options["img_size"]) * ratio)
        names = list(self.classes or [str(i) for i in range(1, self.num_classes + 1)])
        label_to_category = self.label_to_category or {i: i for i in range(1, len(names) + 1)}
        out_dir = Path(output_dir) if output_dir else None
        if out_dir:
            out_dir.mkdir(parents=True, exist_ok=True)
        annotations = options.get("annotations")
        image_ids = image_ids_for(paths, annotations) if annotations else \
            list(range(1, len(paths) + 1))
        model.eval()
        results, every = [], []
        for image_id, path, out_name in zip(image_ids, paths, output_names(paths)):
            try:
                image = TF.pil_to_tensor(load_rgb(path))
            except BadImageError as err:
                results.append({"path": str(path), "error": str(err)})
                continue
            output = model([TF.to_dtype(image, torch.float32, scale=True).to(device)])[0]
            output = {k: v.float() if v.is_floating_point() else v for k, v in output.items()}
            coco = detections_to_coco(output, image_id, label_to_category)
            every += coco
            category_names = {label_to_category[i + 1]: n for i, n in enumerate(names)}
            for det in coco:
                det["category_name"] = category_names.get(det["category_id"], "?")
                det["file_name"] = str(path)
            result: dict[str, Any] = {
                "path": str(path), "height": int(image.shape[1]), "width": int(image.shape[2]),
                "detections": [{k: d[k] for k in ("category_name", "category_id", "score",
                                                   "bbox")} for d in coco if d["score"] >= threshold],
            }
            if out_dir:
                png = out_dir / f"{out_name}_detections.png"
                drawn = draw_detections(image, output, names, score_threshold=threshold)
                with atomic_output(png) as tmp:
                    Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
                result |= {"image": str(png), "json": str(out_dir / "detections.json")}
            results.append(result)
        if out_dir:
            atomic_write_text(out_dir / "detections.json", json.dumps(
                [{k: v for k, v in d.items() if k not in ("category_name", "file_name")}
                 for d in every]))
        return results

    def load_pretrained(self, model: nn.Module, path: str) -> str:
        return load_pretrained_backbone(model, path, self.backbone(model))

    @classmethod
    def demo(cls, output_dir: str, **options: Any) -> dict[str, Any]:
        return run_detection_demo(output_dir, **options)

    # --- checkpoint metadata --------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        return {"classes": self.classes, "arch": self.arch,
                "label_to_category": {str(k): v for k, v in (self.label_to_category or {}).items()}}

    def load_metadata(self, metadata: Mapping[str, Any]) -> None:
        if metadata.get("arch"):  # a box-only dataset may have changed it (_box_only)
            self.options.arch = str(metadata["arch"])
        if metadata.get("classes"):
            self.classes = list(metadata["classes"])
        if metadata.get("label_to_category"):
            self.label_to_category = {int(k): int(v)
                                      for k, v in metadata["label_to_category"].items()}

    def write_report(self, metrics: Mapping[str, float], output_dir: str) -> list[str]:
        """metrics.json and per_category.csv (category id as in the data, name, box AP and
        mask AP; empty where the category has no ground truth in the evaluated images)."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        names = list(self.classes or [])
        ids = self.label_to_category or {i + 1: i + 1 for i in range(len(names))}
        rows = ["category_id,name,AP,mask_AP"]
        for label, name in enumerate(names, start=1):
            cells = [f"{metrics[k]:.4f}" if k in metrics else ""
                     for k in (f"AP/{name}", f"mask_AP/{name}")]
            rows.append(",".join([str(ids.get(label, label)), csv_cell(name), *cells]))
        atomic_write_text(out / "metrics.json", json.dumps(dict(metrics), indent=1) + "\n")
        atomic_write_text(out / "per_category.csv", "\n".join(rows) + "\n")
        return [str(out / "metrics.json"), str(out / "per_category.csv")]

    def format_metrics(self, metrics: Mapping[str, float]) -> str:
        keys = ["AP", "AP50", "AP75", "APs", "APm", "APl", "mask_AP", "mask_AP50", "mask_AP75"]
        line = "  ".join(f"{k}: {metrics[k]:.4f}" for k in keys if k in metrics)
        for prefix in ("AP/", "mask_AP/"):
            per_class = [(k[len(prefix):], v) for k, v in metrics.items() if k.startswith(prefix)]
            if per_class:
                line += f"\nper-category {prefix[:-1]}: " + ", ".join(f"{n} {v:.3f}"
                                                                     for n, v in per_class)
        return line
