"""The detection task's `task_options`, typed and checked (`moat.tasks.options`).

Detector settings that `build_detector` takes default to None: the builder's own default
(one owner for each number). What a `TrainConfig` field already says (model, img_size,
eval_img_size, hflip, bn_momentum, frozen_stages, grad_checkpointing, drop_path_rate,
window_size, pool_size) is set there, not here: one owner per setting, as for segmentation.
The backbone's attention layout is the preset's, changed by TrainConfig's window_size (None:
the preset's) and pool_size (the task's default 3, the preset's) and by
global_attention_at_end below.
"""

from __future__ import annotations

from dataclasses import dataclass

from moat.data.coco import BOX_FORMATS
from moat.tasks.backbone import PRESETS
from moat.tasks.detection.model import ARCHITECTURES
from moat.tasks.options import TaskOptions, need

JITTERS = ("multiscale", "lsj")

# the fields below that go to build_detector as they are (when not None)
DETECTOR_OPTIONS = (
    "fpn_channels", "anchor_sizes", "aspect_ratios", "representation_size", "mask_channels",
    "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test",
    "rpn_post_nms_top_n_test", "rpn_batch_size_per_image", "box_batch_size_per_image",
    "box_score_thresh", "box_nms_thresh", "box_detections_per_img", "train_resize",
    "image_mean", "image_std", "global_attention_at_end")


@dataclass
class DetectionOptions(TaskOptions):
    # --- the detector ----------------------------------------------------------------------
    arch: str = "cascade_mask_rcnn"     # or "mask_rcnn", "faster_rcnn", "cascade_rcnn"
    min_size: int | None = None         # shorter side; None: img_size
    max_size: int | None = None         # longer-side cap; None: min_size * 1333 / 800
    weights: str | None = None          # pretrained backbone weights (loaded before freezing)
    freeze_bn: bool = False             # BatchNorm -> FrozenBatchNorm2d
    preset: str = "detection"           # backbone attention layout (moat.tasks.backbone.PRESETS)
    global_attention_at_end: bool | None = None  # preset override (None: the preset's)
    # build_detector's head settings (None: its default)
    fpn_channels: int | None = None
    anchor_sizes: list | None = None
    aspect_ratios: list | None = None
    representation_size: int | None = None
    mask_channels: int | None = None
    rpn_pre_nms_top_n_train: int | None = None
    rpn_post_nms_top_n_train: int | None = None
    rpn_pre_nms_top_n_test: int | None = None
    rpn_post_nms_top_n_test: int | None = None  # None: by the image area (model.area_scaled)
    rpn_batch_size_per_image: int | None = None
    box_batch_size_per_image: int | None = None  # None: by the image area (model.area_scaled)
    box_score_thresh: float | None = None
    box_nms_thresh: float | None = None
    box_detections_per_img: int | None = None
    train_resize: bool | None = None
    image_mean: list | None = None
    image_std: list | None = None
    # --- data -----------------------------------------------------------------------------
    scale_range: tuple[float, float] = (0.8, 1.25)  # training scale jitter
    jitter: str = "multiscale"          # or "lsj" (large-scale jitter)
    skip_empty: bool = False            # False: images without objects train as negatives
    box_format: str = "xywh"            # COCO JSON boxes: "xywh" (COCO's) or "xyxy" (corners)
    class_names: list | None = None     # None: the dataset's categories
    train_images: str | None = None     # explicit paths instead of `data`'s COCO layout
    train_annotations: str | None = None
    val_images: str | None = None
    val_annotations: str | None = None
    # --- prediction -----------------------------------------------------------------------
    score_threshold: float = 0.5        # drawings and the "detections" list of `moat predict`

    def validate(self) -> None:
        need(self.arch in ARCHITECTURES,
             f"arch {self.arch!r} is unknown; choose one of {list(ARCHITECTURES)}")
        need(self.preset in PRESETS,
             f"preset {self.preset!r} is unknown; choose one of {list(PRESETS)}")
        need(self.box_format in BOX_FORMATS,
             f"box_format {self.box_format!r} is unknown; choose one of {BOX_FORMATS}")
        need(self.jitter in JITTERS, f"jitter {self.jitter!r} is unknown; choose one of {JITTERS}")
        need(0 < self.scale_range[0] <= self.scale_range[1],
             f"scale_range must be [min, max] with 0 < min <= max, got {list(self.scale_range)}")
        need(0 <= self.score_threshold <= 1,
             f"score_threshold must be in [0, 1], got {self.score_threshold}")
        for key in ("min_size", "max_size", "fpn_channels", "representation_size",
                    "mask_channels"):
            value = getattr(self, key)
            need(value is None or value >= 1, f"{key} must be >= 1, got {value}")
