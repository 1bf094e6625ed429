"""One module per benchmark, what torchmetrics and pycocotools do not do: readers, prompts and metrics for
COCO, ADE20K, TextVQA, MMBench and held-out answers. Pure Python/torch: no Lightning, no data modules."""

from piip.evaluation.ade20k import SegmentationScores, segmentation_scores

__all__ = ["SegmentationScores", "segmentation_scores"]
