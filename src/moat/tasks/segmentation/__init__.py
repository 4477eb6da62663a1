"""Semantic segmentation with MOAT: DeepLabv3+ (`model.py`), whole-image and sliding-window
inference (`sliding_window.py`), exact mIoU (`metrics.py`, on the shared `moat.tasks.confusion`),
mask drawing (`drawing.py`), typed options (`options.py`), the "segmentation" task of the
training loop (`task.py`) and its demo (`demo.py`)."""

from moat.tasks.confusion import ConfusionMatrix, confusion_matrix
from moat.tasks.segmentation.demo import DEMO_DATA, DEMO_SETTINGS, run_demo
from moat.tasks.segmentation.drawing import color_palette, overlay, save_mask_png
from moat.tasks.segmentation.metrics import metrics_from_confusion
from moat.tasks.segmentation.model import (ASPP, DeepLabV3Plus, DeepLabV3PlusHead, deeplabv3plus,
                                           default_aspp_rates)
from moat.tasks.segmentation.options import SegmentationOptions
from moat.tasks.segmentation.sliding_window import segment, slide_inference
from moat.tasks.segmentation.task import SegmentationTask

__all__ = ["ASPP", "DEMO_DATA", "DEMO_SETTINGS", "ConfusionMatrix", "DeepLabV3Plus",
           "DeepLabV3PlusHead", "SegmentationOptions", "SegmentationTask", "color_palette",
           "confusion_matrix", "deeplabv3plus", "default_aspp_rates", "metrics_from_confusion",
           "overlay", "run_demo", "save_mask_png", "segment", "slide_inference"]
