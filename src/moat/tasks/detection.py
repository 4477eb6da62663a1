"""Object detection and instance segmentation with MOAT backbones (COCO), and the "detection"
task of the training loop.

Models (torchvision's detection framework with a MOAT + FPN backbone):

* `MoatFPN`: a `moat.tasks.backbone` MOAT ("detection" preset: 14x14 window attention at
  stride 16, global attention at stride 32, shortcut pool 3; any input size) followed by
  torchvision's `FeaturePyramidNetwork` with `LastLevelMaxPool`: five maps at strides
  4..64 with `out_channels` channels, as `BackboneWithFPN` gives for ResNets.
* `build_detector(arch, variant, num_classes)`: "faster_rcnn", "mask_rcnn" (torchvision's
  `FasterRCNN` / `MaskRCNN`), "cascade_rcnn" or "cascade_mask_rcnn" (`moat.tasks.cascade`,
  the detector of the MOAT paper's COCO results).

Task "detection" (`moat train --task detection`): COCO-format data (`moat.data.coco`),
the detectors' own losses, COCO box (and mask) AP from pycocotools' COCOeval, computed once
on rank 0 over the detections of every process. The main metric is **AP** (box AP averaged
over IoU 0.5:0.95), COCO's primary metric and the number the paper reports (59.2 AP^box):
it rewards localisation quality, which is what a cascade is for; AP50 is reported too.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moat.models.blocks import set_batch_norm_momentum
from moat.tasks.backbone import MoatBackbone, build_backbone
from moat.train.task import Task, register_task

__all__ = ["ARCHITECTURES", "DetectionTask", "MoatFPN", "build_detector", "draw_detections",
           "gather_detections", "moat_fpn_backbone", "run_detection_demo"]

ARCHITECTURES = ("faster_rcnn", "mask_rcnn", "cascade_rcnn", "cascade_mask_rcnn")


# --- backbone -----------------------------------------------------------------------------

class MoatFPN(nn.Module):
    """MOAT body + torchvision FPN (+ max-pooled extra level), torchvision's backbone API:
    `forward(images) -> OrderedDict[name, NCHW map]` and `out_channels`.

    Output names: the body's endpoints ("stage2".."stage5": strides 4, 8, 16, 32) and "pool"
    (stride 64, RPN only).
    """

    def __init__(self, body: MoatBackbone, out_channels: int = 256,
                 norm_layer: type[nn.Module] | None = None) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.body = body
        self.fpn = FeaturePyramidNetwork(body.out_channels, out_channels,
                                         extra_blocks=LastLevelMaxPool(), norm_layer=norm_layer)
        self.out_channels = out_channels

    @property
    def featmap_names(self) -> list[str]:
        """The FPN levels the RoI heads pool from (all but "pool")."""
        return list(self.body.names)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body.forward_dict(x))


def moat_fpn_backbone(
    variant: str,
    out_channels: int = 256,
    *,
    preset: str = "detection",
    out_indices: Sequence[int] = (1, 2, 3, 4),
    frozen_stages: int = -1,
    freeze_bn: bool = False,
    grad_checkpointing: bool = False,
    weights=None,
    drop_path_rate: float | None = None,
    **overrides,
) -> MoatFPN:
    """A MOAT + FPN backbone. Arguments as `moat.tasks.backbone.build_backbone`: frozen_stages
    -1 (none), 0 (stem) .. 4; freeze_bn turns BatchNorm into FrozenBatchNorm2d (the usual
    choice when fine-tuning pretrained weights at small per-device batches); weights loads
    pretrained backbone weights; overrides change the preset's window_size /
    global_attention_at_end / pool_size."""
    body = build_backbone(variant, preset, out_indices=out_indices, frozen_stages=frozen_stages,
                          freeze_bn=freeze_bn, grad_checkpointing=grad_checkpointing,
                          weights=weights, drop_path_rate=drop_path_rate, **overrides)
    return MoatFPN(body, out_channels)


# --- detectors ----------------------------------------------------------------------------

def build_detector(
    arch: str = "cascade_mask_rcnn",
    variant: str = "tiny_moat_0",
    num_classes: int = 80,
    *,
    fpn_channels: int = 256,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    anchor_sizes: Sequence[int | Sequence[int]] = (32, 64, 128, 256, 512),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    representation_size: int = 1024,
    mask_channels: int = 256,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_batch_size_per_image: int = 256,
    box_batch_size_per_image: int = 512,
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 100,
    train_resize: bool = False,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    preset: str = "detection",
    frozen_stages: int = -1,
    freeze_bn: bool = False,
    grad_checkpointing: bool = False,
    weights=None,
    drop_path_rate: float | None = None,
    **backbone_overrides,
) -> nn.Module:
    """A torchvision detector on a MOAT + FPN backbone.

    Args:
        arch: "faster_rcnn", "mask_rcnn", "cascade_rcnn" or "cascade_mask_rcnn".
        variant: MOAT variant of the backbone, e.g. "tiny_moat_0" or "moat_0".
        num_classes: object categories, without the background (the heads get one more).
        fpn_channels: FPN width (256 as in the papers; smaller is faster).
        min_size, max_size: evaluation resize of the detector's transform (shorter side,
            longer-side cap); images are mapped back to their own size in the outputs.
        train_resize: False (default) leaves training images at the size the data pipeline
            made (its scale jitter, see `moat.data.coco.train_transforms`); True resizes them
            like evaluation images.
        anchor_sizes: anchor size(s) per FPN level (5 levels): a number or a list of
            sizes each, every size with every one of `aspect_ratios`.
        representation_size: width of the two-layer box heads; mask_channels: width of the
            four mask-head convs.
        rpn_* / box_*: torchvision's FasterRCNN settings of the same names.
        image_mean, image_std: normalisation on [0, 1] images; default the variant's
            released checkpoints' (`moat.preprocessing`).
        preset, frozen_stages, freeze_bn, grad_checkpointing, weights, drop_path_rate,
            backbone_overrides: the backbone's (`moat_fpn_backbone`).

    Returns a `torchvision.models.detection.GeneralizedRCNN`: in train mode
    `model(images, targets)` gives a dict of losses, in eval mode `model(images)` a list of
    {"boxes" (XYXY), "labels" (1..num_classes), "scores"[, "masks" [N,1,H,W]]} per image.
    """
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import MultiScaleRoIAlign

    from moat.preprocessing import variant_data_config
    from moat.tasks.cascade import CascadeRCNN

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown detector {arch!r}; choose one of {list(ARCHITECTURES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    backbone = moat_fpn_backbone(
        variant, fpn_channels, preset=preset, frozen_stages=frozen_stages, freeze_bn=freeze_bn,
        grad_checkpointing=grad_checkpointing, weights=weights, drop_path_rate=drop_path_rate,
        **backbone_overrides)
    levels = len(backbone.featmap_names) + 1  # + the max-pooled level
    if len(anchor_sizes) != levels:
        raise ValueError(f"anchor_sizes needs one size per FPN level ({levels}), "
                         f"got {list(anchor_sizes)}")
    sizes = tuple(tuple(int(v) for v in s) if isinstance(s, Sequence) else (int(s),)
                  for s in anchor_sizes)
    anchors = AnchorGenerator(sizes, (tuple(float(a) for a in aspect_ratios),) * levels)
    data = variant_data_config(variant)
    names = backbone.featmap_names
    box_roi_pool = MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2)
    common = dict(
        min_size=min_size, max_size=max_size,
        image_mean=list(image_mean or data["mean"]), image_std=list(image_std or data["std"]),
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(fpn_channels, anchors.num_anchors_per_location()[0]),
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        box_roi_pool=box_roi_pool, box_score_thresh=box_score_thresh,
        box_nms_thresh=box_nms_thresh, box_detections_per_img=box_detections_per_img,
        box_batch_size_per_image=box_batch_size_per_image,
        _skip_resize=not train_resize,  # GeneralizedRCNNTransform: no resize in training
    )
    mask = {}
    if arch.endswith("mask_rcnn"):
        mask = dict(mask_roi_pool=MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2),
                    mask_head=MaskRCNNHeads(fpn_channels, [mask_channels] * 4, 1),
                    mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels,
                                                     num_classes + 1))
    if arch.startswith("cascade"):
        model = CascadeRCNN(backbone, num_classes + 1, representation_size=representation_size,
                            **common, **mask)
    else:
        box = dict(box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),
                   box_predictor=FastRCNNPredictor(representation_size, num_classes + 1))
        model = (MaskRCNN if mask else FasterRCNN)(backbone, None, **common, **box, **mask)
    model.arch = arch
    return model


# --- distributed evaluation ---------------------------------------------------------------

def gather_detections(per_image: Mapping[int, list[dict]]) -> dict[int, list[dict]] | None:
    """Merge every process's {image_id: COCO result dicts} on rank 0 (None elsewhere).

    Uses `torch.distributed.all_gather_object`; without an initialised process group it
    returns the input. An image seen by several processes (samplers pad the last batch with
    repeats) keeps the first process's detections, so nothing is counted twice.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(per_image)
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, dict(per_image))
    if dist.get_rank() != 0:
        return None
    merged: dict[int, list[dict]] = {}
    for part in parts:
        for image_id, dets in part.items():
            merged.setdefault(image_id, dets)
    return merged


def _broadcast(obj: Any) -> Any:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _coco_dataset(dataset: Any):
    """The pycocotools COCO object of a (possibly wrapped) CocoDetection dataset."""
    while not hasattr(dataset, "coco") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    coco = getattr(dataset, "coco", None)
    if coco is None:
        raise ValueError("detection evaluation needs a moat.data.coco.CocoDetection dataset")
    return dataset


# --- drawing ------------------------------------------------------------------------------

def _palette(n: int) -> list[tuple[int, int, int]]:
    import colorsys

    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 1.0))
            for i in range(n)]


def draw_detections(image: Tensor, output: Mapping[str, Tensor], class_names: Sequence[str],
                    score_threshold: float = 0.5, mask_threshold: float = 0.5,
                    mask_alpha: float = 0.45) -> Tensor:
    """The uint8 CHW image with mask overlays, boxes and "name score" labels of the detections
    scoring at least `score_threshold` (torchvision's draw_segmentation_masks /
    draw_bounding_boxes). Colours follow the class."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    keep = output["scores"] >= score_threshold
    boxes = output["boxes"][keep].float().cpu()
    labels = output["labels"][keep].cpu().tolist()
    scores = output["scores"][keep].float().cpu().tolist()
    palette = _palette(len(class_names) + 1)
    colors = [palette[label] for label in labels]
    out = image.cpu()
    if "masks" in output and len(labels):
        masks = output["masks"][keep][:, 0].float().cpu() > mask_threshold
        out = draw_segmentation_masks(out, masks, alpha=mask_alpha, colors=colors)
    if len(labels):
        text = [f"{class_names[label - 1] if 0 < label <= len(class_names) else label} "
                f"{score:.2f}" for label, score in zip(labels, scores)]
        width = max(1, round(max(image.shape[-2:]) / 300))
        out = draw_bounding_boxes(out, boxes, labels=text, colors=colors, width=width)
    return out


# --- the task -----------------------------------------------------------------------------

def _option(config: Any, name: str, default: Any) -> Any:
    """A task setting: `config.task_options[name]`, else attribute `name`, else default."""
    options = getattr(config, "task_options", None) or {}
    if name in options:
        return options[name]
    value = getattr(config, name, None)
    return default if value is None else value


def _find_split(root: Path, split: str) -> tuple[Path, Path]:
    """(image folder, instances JSON) of a split in COCO's layout:
    root/annotations/instances_<name>.json with images in root/<name> or root/images/<name>,
    where <name> starts with the split ("train", "train2017", ...)."""
    anns = sorted((root / "annotations").glob(f"instances_{split}*.json"))
    for ann in anns:
        name = ann.stem[len("instances_"):]
        for folder in (root / name, root / "images" / name):
            if folder.is_dir():
                return folder, ann
    raise FileNotFoundError(
        f"no COCO {split!r} split under {str(root)!r}: expected "
        f"annotations/instances_{split}*.json with images in a folder of the same name "
        f"(e.g. annotations/instances_{split}2017.json + {split}2017/), or set "
        f"task_options {split}_images / {split}_annotations")


@register_task
class DetectionTask(Task):
    """COCO-style detection / instance segmentation (see the module docstring).

    Config fields used: model (backbone variant), data (a COCO-layout folder:
    annotations/instances_<split>*.json + images in <split>*/), img_size (the shorter side
    images are trained and evaluated at; default 800), eval_img_size (evaluation shorter side,
    default img_size), hflip, frozen_stages, grad_checkpointing, drop_path_rate.

    `task_options`: arch ("cascade_mask_rcnn", "mask_rcnn", "faster_rcnn", "cascade_rcnn"),
    max_size (longer-side cap, default img_size * 1333 / 800), scale_range ((0.8, 1.25)),
    jitter ("multiscale" or "lsj"), skip_empty (False: images without objects train as
    negatives), train_images / train_annotations / val_images / val_annotations (explicit
    paths instead of `data`), weights (pretrained backbone), freeze_bn (False), preset
    ("detection"), window_size / global_attention_at_end / pool_size (preset overrides),
    score_threshold (0.5; drawing and the "detections" list of `moat predict`), and
    `build_detector`'s head settings: fpn_channels, anchor_sizes, aspect_ratios,
    representation_size, mask_channels, rpn_* and box_* (e.g. box_detections_per_img).
    """

    name = "detection"
    main_metric = "AP"
    # Common COCO fine-tuning practice for attention backbones (Swin / ConvNeXt Cascade Mask
    # R-CNN "1x": AdamW 1e-4, wd 0.05, batch 16, 12 epochs, multi-scale + flip); the MOAT
    # paper's schedule is not available (MODEL_ZOO.md section 5).
    config_defaults: Mapping[str, Any] = {
        "img_size": 800, "epochs": 12, "batch_size": 16, "lr": 1e-4, "min_lr": 1e-6,
        "weight_decay": 0.05, "warmup_epochs": 0.1, "clip_grad": None, "ema": False,
        "label_smoothing": 0.0, "randaugment": None, "mixup": 0.0, "cutmix": 0.0,
    }

    _DETECTOR_OPTIONS = ("fpn_channels", "anchor_sizes", "aspect_ratios", "representation_size",
                         "mask_channels", "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train",
                         "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test",
                         "rpn_batch_size_per_image", "box_batch_size_per_image",
                         "box_score_thresh", "box_nms_thresh", "box_detections_per_img",
                         "train_resize", "image_mean", "image_std", "window_size",
                         "global_attention_at_end", "pool_size")

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.classes: list[str] | None = self.task_option("class_names")
        self.label_to_category: dict[int, int] | None = None
        self._eval_dataset = None

    def option(self, name: str, default: Any = None) -> Any:
        """A setting from task_options, else the config field of that name, else default."""
        return _option(self.config, name, default)

    def task_option(self, name: str, default: Any = None) -> Any:
        """A setting from task_options only (config fields of the same name are the
        classification recipe's, e.g. pool_size 2)."""
        return (getattr(self.config, "task_options", None) or {}).get(name, default)

    @property
    def arch(self) -> str:
        return self.task_option("arch", "cascade_mask_rcnn")

    @property
    def with_masks(self) -> bool:
        return self.arch.endswith("mask_rcnn")

    @property
    def num_classes(self) -> int:
        if self.classes:
            return len(self.classes)
        n = self.option("num_classes", None)
        if not n:
            raise ValueError("detection needs the class names: build the datasets first, or "
                             "load a checkpoint (its metadata has them)")
        return int(n)

    @property
    def min_size(self) -> int:
        return int(self.task_option("min_size", None) or self.option("img_size", 800))

    @property
    def max_size(self) -> int:
        return int(self.task_option("max_size", None) or round(self.min_size * 1333 / 800))

    # --- contract -----------------------------------------------------------------------

    def build_model(self) -> nn.Module:
        extra = {k: self.task_option(k) for k in self._DETECTOR_OPTIONS
                 if self.task_option(k) is not None}
        eval_size = self.option("eval_img_size", None)
        min_size = int(eval_size or self.min_size)
        max_size = self.max_size if not eval_size else round(self.max_size * min_size
                                                               / self.min_size)
        model = build_detector(
            self.arch, self.option("model", "tiny_moat_0"), self.num_classes,
            min_size=min_size, max_size=max_size, preset=self.task_option("preset", "detection"),
            frozen_stages=int(self.option("frozen_stages", -1)),
            freeze_bn=bool(self.task_option("freeze_bn", False)),
            grad_checkpointing=bool(self.option("grad_checkpointing", False)),
            drop_path_rate=self.option("drop_path_rate", None),
            weights=self.task_option("weights", None), **extra)
        set_batch_norm_momentum(model, getattr(self.config, "bn_momentum", None))
        return model

    def _split(self, split: str) -> tuple[Path, Path]:
        images, anns = self.option(f"{split}_images"), self.option(f"{split}_annotations")
        if images and anns:
            return Path(images), Path(anns)
        root = self.option("data", None) or self.option("data_dir", None)
        if root is None:
            raise ValueError("detection needs a COCO-format dataset folder (data) or "
                             f"{split}_images + {split}_annotations")
        return _find_split(Path(root), split)

    def _set_classes(self, dataset) -> None:
        if self.classes and list(self.classes) != dataset.classes:
            raise ValueError(f"the dataset's categories {dataset.classes} differ from the "
                             f"configured ones {list(self.classes)}")
        self.classes = dataset.classes
        self.label_to_category = dict(dataset.label_to_category)
        if hasattr(self.config, "num_classes"):
            self.config.num_classes = len(dataset.classes)

    def build_datasets(self):
        from moat.data.coco import CocoDetection, train_transforms

        tf = train_transforms(self.min_size, self.max_size,
                              scale_range=tuple(self.task_option("scale_range", (0.8, 1.25))),
                              jitter=self.task_option("jitter", "multiscale"),
                              hflip=float(self.option("hflip", 0.5)))
        images, anns = self._split("train")
        train = CocoDetection(images, anns, tf, train=True, masks=self.with_masks,
                              skip_empty=bool(self.task_option("skip_empty", False)))
        self._set_classes(train)
        val = self.build_eval_dataset()
        if val.classes != train.classes:
            raise ValueError(f"train and val categories differ: {train.classes} vs {val.classes}")
        return train, val

    def build_eval_dataset(self):
        from moat.data.coco import CocoDetection, eval_transforms

        images, anns = self._split("val")
        val = CocoDetection(images, anns, eval_transforms(), masks=False)
        if self.classes is None:
            self._set_classes(val)
        self._eval_dataset = val
        return val

    def collate_fn(self, train: bool):
        from moat.data.coco import collate_detection

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
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
        from moat.data.coco import coco_evaluate, detections_to_coco

        dataset = getattr(loader, "dataset", None)  # the loop passes a generator
        dataset = _coco_dataset(self._eval_dataset if dataset is None else dataset)
        was_training = model.training
        model.eval()
        per_image: dict[int, list[dict]] = {}
        for batch in loader:
            images, targets = self._to_device(batch, device)
            if not images:
                continue
            for output, target in zip(model(images), targets):
                image_id = int(target["image_id"])
                per_image[image_id] = detections_to_coco(output, image_id,
                                                         dataset.label_to_category)
        model.train(was_training)
        merged = gather_detections(per_image)
        metrics = None
        if merged is not None:
            results = [r for dets in merged.values() for r in dets]
            iou_types = ("bbox", "segm") if any("segmentation" in r for r in results) or (
                self.with_masks) else ("bbox",)
            metrics = coco_evaluate(dataset.coco, results, iou_types, image_ids=merged.keys())
        return _broadcast(metrics)

    @torch.no_grad()
    def predict(self, model: nn.Module, paths: Sequence[str], device: torch.device,
                output_dir: str | None = None, **options: Any) -> list[dict]:
        """Per image: detections (category name and id, score, COCO bbox [x, y, w, h], and
        an RLE mask with a mask head); with `output_dir`, `<stem>_detections.png` (boxes,
        labels, scores, masks drawn for scores >= score_threshold) and
        `<stem>_detections.json` (COCO results format, every detection)."""
        from PIL import Image
        from torchvision.transforms.v2 import functional as TF

        from moat.data.coco import detections_to_coco
        from moat.data.images import load_rgb

        threshold = float(options.get("score_threshold") or
                          self.task_option("score_threshold", 0.5))
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
        model.eval()
        results = []
        for index, path in enumerate(paths):
            image = TF.pil_to_tensor(load_rgb(path))
            output = model([TF.to_dtype(image, torch.float32, scale=True).to(device)])[0]
            output = {k: v.float() if v.is_floating_point() else v for k, v in output.items()}
            coco = detections_to_coco(output, index + 1, label_to_category)
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
                stem = Path(path).stem
                png, js = out_dir / f"{stem}_detections.png", out_dir / f"{stem}_detections.json"
                drawn = draw_detections(image, output, names, score_threshold=threshold)
                Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(png)
                js.write_text(json.dumps(coco))
                result |= {"image": str(png), "json": str(js)}
            results.append(result)
        return results

    def load_pretrained(self, model: nn.Module, path: str) -> str:
        """`--init-from`: backbone (or whole-detector) weights; frozen BatchNorm is thawed
        while loading so official-weight loaders find BatchNorm2d layers."""
        from moat.tasks.backbone import batch_norm_thawed
        from moat.train.checkpoint import load_pretrained

        backbone = self.backbone(model)
        with batch_norm_thawed(backbone):
            return load_pretrained(model, path, backbone=backbone)

    @classmethod
    def demo(cls, output_dir: str, **options: Any) -> dict[str, Any]:
        return run_detection_demo(output_dir, **options)

    # --- checkpoint metadata --------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        return {"classes": self.classes, "arch": self.arch,
                "label_to_category": {str(k): v for k, v in (self.label_to_category or {}).items()}}

    def load_metadata(self, metadata: Mapping[str, Any]) -> None:
        if metadata.get("classes"):
            self.classes = list(metadata["classes"])
        if metadata.get("label_to_category"):
            self.label_to_category = {int(k): int(v)
                                      for k, v in metadata["label_to_category"].items()}

    def format_metrics(self, metrics: Mapping[str, float]) -> str:
        keys = ["AP", "AP50", "AP75", "APs", "APm", "APl", "mask_AP", "mask_AP50", "mask_AP75"]
        return "  ".join(f"{k}: {metrics[k]:.4f}" for k in keys if k in metrics)


# --- demo ---------------------------------------------------------------------------------

# The generated dataset and the short CPU schedule of `moat demo --task detection`: Cascade
# Mask R-CNN on tiny-MOAT-0 with light heads (64-channel FPN, 256-wide box heads, 64-channel
# mask head, fewer RoIs) at 128 px, trained from scratch.
DEMO_DATA = dict(num_train=800, num_val=100, img_size=128, max_objects=3)
DEMO_SETTINGS: dict[str, Any] = dict(
    task="detection", model="tiny_moat_0", img_size=128, epochs=6, batch_size=8, lr=2e-3,
    min_lr=1e-5, warmup_epochs=0.3, weight_decay=0.05, clip_grad=10.0, ema=False, workers=0,
    bn_momentum=0.1,  # the official 0.01 leaves BN statistics stale after a short schedule
    eval_every_epochs=6, log_every_steps=20, tensorboard=False,
    task_options=dict(
        arch="cascade_mask_rcnn", fpn_channels=64, representation_size=256, mask_channels=64,
        anchor_sizes=[16, 32, 64, 128, 256], rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100, box_batch_size_per_image=64, scale_range=[0.8, 1.25]),
)


def run_detection_demo(output_dir: str | Path = "moat-demo-detection", *,
                       epochs: int | None = None, overrides: Sequence[str] = (),
                       progress: bool = True, **_: Any) -> dict[str, Any]:
    """Write the synthetic detection dataset, train the demo detector on it through the shared
    loop, evaluate (COCO box and mask AP) and draw the detections of a few validation images."""
    from moat.data.synthetic_detection import write_synthetic_detection
    from moat.train.demo import train_evaluate_predict

    out = Path(output_dir)
    t0 = time.time()
    data = write_synthetic_detection(out / "data", **DEMO_DATA)
    samples = [str(p) for p in sorted(data.images("val").iterdir())[:6]]
    result = train_evaluate_predict(
        out, str(data.root), DEMO_SETTINGS, samples=samples, epochs=epochs,
        overrides=overrides, progress=progress, eval_options={"batch_size": 8, "workers": 0},
        predict_options={"output_dir": str(out / "predictions")})
    result["outputs"]["drawings"] = str(out / "predictions")
    metrics, config = result["metrics"], result["config"]
    arch = config.task_options.get("arch", "cascade_mask_rcnn")
    masks = (f"  mask AP: {metrics['mask_AP']:.4f}  mask AP50: {metrics['mask_AP50']:.4f}"
             if "mask_AP" in metrics else "")
    result["summary"] = (f"box AP: {metrics['AP']:.4f}  box AP50: {metrics['AP50']:.4f}{masks}  "
                         f"({arch}, {config.model}, {config.epochs} epochs, "
                         f"{time.time() - t0:.0f} s)")
    return result
