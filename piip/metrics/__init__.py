"""What torchmetrics lacks: COCO results JSON + COCOeval, segmentation IoU/accuracy in the ADE20K sense."""

from piip.metrics.segmentation import SegmentationScores, segmentation_scores

__all__ = ["SegmentationScores", "segmentation_scores"]
