"""What a generative benchmark is to the multimodal task: its questions, its metric, and how many tokens an
answer may take. One `QuestionSource` per benchmark (TextVQA, MMBench, held-out conversations)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Question:
    """One prompt to answer; `meta` travels to the source's metric with the generated text."""

    text: str
    image: Any  # a path, PNG/JPEG bytes, or None for a text-only question
    meta: dict[str, Any] = field(default_factory=dict)


class QuestionSource(ABC):
    """A benchmark: its questions, its metric, and how many tokens an answer may take."""

    name: str
    max_new_tokens: int = 16

    @abstractmethod
    def questions(self) -> list[Question]: ...

    @abstractmethod
    def metric(self) -> Any:
        """A fresh accumulator with update/compute/state/merge/records (piip.evaluation)."""

    @abstractmethod
    def update(self, metric: Any, metas: list[dict[str, Any]], answers: list[str]) -> None: ...
