"""LightningModules (one per task), the optimisation they share, and `TaskData`: what they learn from their
data."""

from piip.tasks.base import NonFiniteLossError, PIIPTask
from piip.tasks.classification import ClassificationTask
from piip.tasks.data import TaskData
from piip.tasks.detection import DetectionTask
from piip.tasks.multimodal import MultimodalTask
from piip.tasks.segmentation import SegmentationTask

__all__ = [
    "ClassificationTask",
    "DetectionTask",
    "MultimodalTask",
    "NonFiniteLossError",
    "PIIPTask",
    "SegmentationTask",
    "TaskData",
]
