"""Per-question bookkeeping shared by the generative benchmarks: one record per question id (first one wins,
so a distributed sampler's padded repeats count once), with a picklable `state()` that ranks gather with
`all_gather_object` and rank 0 `merge`s."""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any


def plain_value(value: Any) -> Any:
    """A 0-d tensor / numpy scalar as its Python value, so ids hash by value and pickle small."""
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, (str, bytes)):
        return item()
    return value


class QuestionRecords:
    """One record (a dict) per key, first one kept; picklable `state()` and `merge()` for gathering.

    Subclasses name the fields that form the key in `key_fields` and add records with `_add`.
    """

    key_fields: tuple[str, ...] = ("question_id",)

    def __init__(self) -> None:
        self._records: dict[Hashable, dict[str, Any]] = {}

    def _add(self, record: dict[str, Any]) -> None:
        key = tuple(record[field] for field in self.key_fields)
        self._records.setdefault(key, record)  # a repeat (e.g. sampler padding) keeps the first record

    def reset(self) -> None:
        """Forget every record (call between evaluation epochs)."""
        self._records.clear()

    def records(self) -> list[dict[str, Any]]:
        """Copies of the records in insertion order, e.g. to write an answers file."""
        return [dict(record) for record in self._records.values()]

    def __len__(self) -> int:
        return len(self._records)

    def state(self) -> dict[str, Any]:
        """Plain-Python state for `torch.distributed.all_gather_object`."""
        return {"kind": type(self).__name__, "records": self.records()}

    def merge(self, states: Iterable[Mapping[str, Any]]) -> None:
        """Add gathered states' records; keys already held win, so the list may include our own state."""
        for number, state in enumerate(states):
            if not isinstance(state, Mapping) or "records" not in state:
                raise ValueError(f"state #{number} is not a {type(self).__name__}.state(): {type(state)}")
            kind = state.get("kind")
            if kind != type(self).__name__:
                raise ValueError(
                    f"state #{number} comes from {kind!r}, cannot merge into {type(self).__name__}"
                )
            for record in state["records"]:
                self._add(dict(record))


class AccuracyRecords(QuestionRecords):
    """Per-question accuracy in [0, 1] from `score(prediction, reference)`; `compute()` averages them."""

    def score(self, prediction: str, reference: Any) -> float:
        raise NotImplementedError

    def update(
        self, question_ids: Sequence[Any], predictions: Sequence[str], references: Sequence[Any]
    ) -> None:
        """Score one batch; ids already seen (on this rank) keep their first record."""
        if not len(question_ids) == len(predictions) == len(references):
            raise ValueError(
                f"{type(self).__name__}.update: {len(question_ids)} question ids, {len(predictions)} "
                f"predictions and {len(references)} references; they must match one to one"
            )
        for question_id, prediction, reference in zip(question_ids, predictions, references, strict=True):
            question_id = plain_value(question_id)
            if (question_id,) in self._records:
                continue  # skip scoring a repeat: it would be dropped anyway
            self._add(
                {
                    "question_id": question_id,
                    "prediction": prediction,
                    "accuracy": self.score(prediction, reference),
                }
            )

    def compute(self) -> dict[str, float]:
        """`accuracy`: the mean over distinct questions (nan when there are none); `count`: how many."""
        count = len(self._records)
        total = sum(record["accuracy"] for record in self._records.values())
        return {"accuracy": total / count if count else math.nan, "count": count}
