"""Object detection and instance segmentation with MOAT backbones (COCO): detectors on a MOAT
+ FPN backbone (`model.py`, the Cascade R-CNN of the paper in `cascade.py`), COCO evaluation
across processes (`metrics.py`), drawings (`drawing.py`), typed options (`options.py`), the
"detection" task of the training loop (`task.py`) and its demo (`demo.py`)."""

from moat.tasks.detection.demo import DEMO_DATA, DEMO_SETTINGS, run_detection_demo
from moat.tasks.detection.drawing import draw_detections
from moat.tasks.detection.metrics import gather_detections
from moat.tasks.detection.model import ARCHITECTURES, MoatFPN, build_detector, moat_fpn_backbone
from moat.tasks.detection.options import DetectionOptions
from moat.tasks.detection.task import DetectionTask

__all__ = ["ARCHITECTURES", "DEMO_DATA", "DEMO_SETTINGS", "DetectionOptions", "DetectionTask",
           "MoatFPN", "build_detector", "draw_detections", "gather_detections",
           "moat_fpn_backbone", "run_detection_demo"]
