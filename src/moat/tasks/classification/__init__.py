"""Image classification: the "classification" task of the training loop (`task.py`) and its
demo (`demo.py`); the shared confusion matrix and report are `moat.tasks.confusion`."""

from moat.tasks.classification.demo import DEMO_DATA, DEMO_SETTINGS, run_demo
from moat.tasks.classification.task import ClassificationTask

__all__ = ["DEMO_DATA", "DEMO_SETTINGS", "ClassificationTask", "run_demo"]
