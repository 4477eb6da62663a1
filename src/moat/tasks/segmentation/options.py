"""The segmentation task's `task_options`, typed and checked (`moat.tasks.options`).

Model settings that `deeplabv3plus` takes default to None: the builder's own default (one
owner for each number). Everything a `TrainConfig` field already says (model, img_size,
bn_momentum, frozen_stages, window_size, pool_size, ...) is set there, not here.
"""

from __future__ import annotations

from dataclasses import dataclass

from moat.data.masks import IGNORE_INDEX
from moat.tasks.backbone import PRESETS
from moat.tasks.options import TaskOptions, need

INFERENCE_MODES = ("whole", "slide")
LAYOUTS = ("auto", "ade20k", "folder")


@dataclass
class SegmentationOptions(TaskOptions):
    # --- model: DeepLabv3+ (None: deeplabv3plus's default) -----------------------------------
    preset: str = "segmentation"        # backbone attention layout (moat.tasks.backbone.PRESETS)
    output_stride: int | None = None    # 32 or 16 (the last stage dilated)
    aspp_channels: int | None = None
    decoder_channels: int | None = None
    low_level_channels: int | None = None
    dropout: float | None = None
    freeze_bn: bool = False             # BatchNorm -> FrozenBatchNorm2d (fine-tuning, small batches)
    global_attention_at_end: bool | None = None  # None: the preset's
    # --- data ---------------------------------------------------------------------------------
    ignore_index: int = IGNORE_INDEX    # mask value that is no class: no loss, no metric
    layout: str = "auto"                # "ade20k", "folder" (images/ + masks/) or "auto"
    reduce_zero_label: bool | None = None  # None: the layout's (ADE20K true, folders false)
    class_names: list | None = None     # None: classes.json, classes.txt or segmentation.json
    class_colors: list | None = None    # [[R, G, B], ...] per class: colour-coded (RGB) masks;
    #                                     None: the colours of classes.json, if any
    binary: bool = False                # 0 -> class 0, other values (0/255 masks: > 127) -> 1
    scale_range: tuple[float, float] = (0.5, 2.0)  # training rescale range of the crop side
    base_size: int | None = None        # None: the crop side
    photometric: bool = True            # colour jitter in training
    # --- inference (evaluation and prediction) ------------------------------------------------
    inference: str = "whole"            # "whole" image or "slide" windows
    slide_crop: int | list | None = None    # None: img_size
    slide_stride: int | list | None = None  # None: 2/3 of the window
    flip_test: bool = False             # average with the mirrored image's logits

    def validate(self) -> None:
        need(self.preset in PRESETS, f"preset {self.preset!r} is unknown; choose one of "
             f"{list(PRESETS)}")
        need(self.output_stride in (None, 16, 32),
             f"output_stride must be 32 or 16, got {self.output_stride}")
        need(self.dropout is None or 0 <= self.dropout < 1,
             f"dropout must be in [0, 1), got {self.dropout}")
        need(0 <= self.ignore_index, f"ignore_index must be >= 0, got {self.ignore_index}")
        need(self.class_colors is None or all(
            isinstance(c, (list, tuple)) and len(c) == 3 for c in self.class_colors),
            "class_colors must be a list of [R, G, B] colours, one per class")
        need(not (self.binary and self.class_colors),
             "binary and class_colors exclude each other: binary masks have no colours")
        need(self.layout in LAYOUTS, f"layout {self.layout!r} is unknown; choose one of {LAYOUTS}")
        need(0 < self.scale_range[0] <= self.scale_range[1],
             f"scale_range must be [min, max] with 0 < min <= max, got {list(self.scale_range)}")
        need(self.inference in INFERENCE_MODES,
             f"inference {self.inference!r} is unknown; choose one of {INFERENCE_MODES}")
        for key in ("aspp_channels", "decoder_channels", "low_level_channels", "base_size"):
            value = getattr(self, key)
            need(value is None or value >= 1, f"{key} must be >= 1, got {value}")
