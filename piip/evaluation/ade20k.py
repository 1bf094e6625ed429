"""mIoU, mAcc and aAcc as mmsegmentation reports them for ADE20K, from one confusion matrix.

The matrix is torchmetrics' `MulticlassConfusionMatrix` (rows = ground truth, columns = prediction), summed
over the whole split (and over devices) before any ratio is taken: IoU is a dataset-level ratio, not a mean
over images. Classes with no pixel in the ground truth nor in the prediction have no IoU and drop out of the
mean; mAcc averages over the classes present in the ground truth.
"""

from __future__ import annotations

import torch
from torchmetrics.classification import MulticlassConfusionMatrix

IGNORE_INDEX = 255


def segmentation_scores(confmat: torch.Tensor) -> dict[str, torch.Tensor]:
    """`mIoU`, `mAcc`, `aAcc` (fractions in [0, 1]) of a C×C confusion matrix (rows: ground truth)."""
    confmat = confmat.double()
    true_positive = confmat.diagonal()
    labelled = confmat.sum(dim=1)  # TP + FN
    predicted = confmat.sum(dim=0)  # TP + FP
    union = labelled + predicted - true_positive
    iou = true_positive / union  # 0/0 = nan for classes absent from both
    accuracy = true_positive / labelled  # nan for classes absent from the ground truth
    return {
        "mIoU": iou.nanmean().float(),
        "mAcc": accuracy.nanmean().float(),
        "aAcc": (true_positive.sum() / labelled.sum()).float(),
    }


class SegmentationScores(MulticlassConfusionMatrix):
    """Accumulates the confusion matrix of label maps; `compute()` returns `segmentation_scores` of it.

    `update(preds, target)` takes class-index maps of equal shape; pixels labelled `ignore_index` are skipped.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        # validate_args would scan every pixel on each update; labels are checked when loaded
        super().__init__(num_classes, ignore_index=ignore_index, validate_args=False)

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return segmentation_scores(super().compute())
