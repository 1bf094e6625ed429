"""LightningModules (one per task) and the optimisation they share."""

from piip.tasks.base import NonFiniteLossError, PIIPTask
from piip.tasks.classification import ClassificationTask

__all__ = ["ClassificationTask", "NonFiniteLossError", "PIIPTask"]
