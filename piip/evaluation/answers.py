"""Held-out answers: the toy benchmark of the embedded data (and any LLaVA JSON split), scored by exact match
after the VQA answer normalisation. Its questions are read by `piip.data.llava.questions`."""

from __future__ import annotations

from piip.evaluation.records import AccuracyRecords
from piip.evaluation.textvqa import normalize_answer


class AnswerAccuracy(AccuracyRecords):
    """Exact match against a single reference answer (after `normalize_answer`), e.g. held-out toy QA."""

    def score(self, prediction: str, reference: str) -> float:
        return float(normalize_answer(prediction) == normalize_answer(reference))
