"""LightningModules (one per task) and the optimisation they share."""

from piip.tasks.base import NonFiniteLossError, PIIPTask
from piip.tasks.classification import ClassificationTask
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
]
