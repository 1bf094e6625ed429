"""`TaskData`: everything a task learns from its data, in one declared contract.

The run layer builds the data module and the task, then hands the data to the task with
`PIIPTask.attach_data` before fitting or evaluating; no task reads `trainer.datamodule`. A data module offers
what its format has and leaves the rest `None` (`piip.data.base.ResumableDataModule` gives those defaults):
COCO has category ids and ground truth, the LLaVA data a question source, ImageNet folders class names.
The other direction, what the data needs from the model (e.g. how many visual tokens an image becomes), goes
from `PIIPTask.data_needs` to `TaskData.fit_to_task`, both called by `piip.run.build.connect`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class TaskData(Protocol):
    """What a data module offers the task it feeds."""

    root: Path | str | None
    """Where the data lives, for messages."""

    @property
    def num_classes(self) -> int | None:
        """Classes found in the data (the task refuses a model built for another count); None if unknown."""

    @property
    def class_names(self) -> list[str] | None:
        """Names of the classes in label order (label k -> class_names[k], detection: label k -> k - 1);
        kept in checkpoints so predictions can be captioned without the data."""

    @property
    def category_ids(self) -> list[int] | None:
        """Detection: the annotation file's category id of each contiguous label (label k -> ids[k - 1])."""

    def ground_truth(self) -> Any:
        """Detection: the evaluation split's annotations as a pycocotools `COCO` object, for COCOeval."""

    @property
    def question_source(self) -> Any:
        """Multimodal: the `piip.evaluation.questions.QuestionSource` whose questions the validation loader
        yields, which also makes and updates the benchmark's metric; None for other tasks."""

    def prediction_input(self, path: str | Path) -> tuple[Any, dict[str, Any]]:
        """One image file prepared as a validation sample (image, target), for `piip.tools.predict`."""

    def fit_to_task(self, **needs: Any) -> None:
        """Take what the task's model fixes about the data (`PIIPTask.data_needs`, e.g. `visual_tokens`,
        `max_positions`), before any loader is built; refuse settings that cannot work with it."""
