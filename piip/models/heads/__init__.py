"""What sits on the backbone: classifiers, Mask R-CNN, UperNet (+ sliding inference), the LLaVA projector
and language model."""

from piip.models.heads.classifier import BranchClassifier, MergedClassifier

__all__ = ["BranchClassifier", "MergedClassifier"]
