"""The question sets a PIIP-LLaVA model answers by greedy generation for evaluation (`task.data.eval`):
held-out conversations of the training format, TextVQA and MMBench (`piip.evaluation`), as prompt datasets."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from piip.data.base import load_rgb
from piip.data.llava.conversation import IMAGE_PLACEHOLDER, Conversation, Template, generation_prompt
from piip.data.llava.dataset import ImageProcessor, PromptBatch, read_samples
from piip.data.sampling import SampleKey
from piip.errors import ConfigError, DataError
from piip.evaluation.answers import AnswerAccuracy
from piip.evaluation.mmbench import MMBench
from piip.evaluation.questions import Question, QuestionSource
from piip.evaluation.textvqa import TextVQA


class HeldOutConversations(QuestionSource):
    """First question of every sample of a LLaVA JSON file; its first answer is the reference."""

    name = "answer"

    def __init__(self, file: Path, image_folder: Path, max_new_tokens: int = 16) -> None:
        self.file, self.image_folder, self.max_new_tokens = file, image_folder, max_new_tokens

    def questions(self) -> list[Question]:
        out = []
        for sample in read_samples(self.file):
            conversation = Conversation.from_llava(sample, str(self.file))
            turn = conversation.turns[0]
            image = self.image_folder / conversation.image if conversation.image else None
            text = turn.human.replace(IMAGE_PLACEHOLDER, "").strip()
            out.append(
                Question(text, image, {"question_id": conversation.id, "answer": turn.assistant or ""})
            )
        return out

    def metric(self) -> AnswerAccuracy:
        return AnswerAccuracy()

    def update(self, metric: AnswerAccuracy, metas: list[dict[str, Any]], answers: list[str]) -> None:
        metric.update([m["question_id"] for m in metas], answers, [m["answer"] for m in metas])


QUESTION_SOURCES = {"conversations": HeldOutConversations, "textvqa": TextVQA, "mmbench": MMBench}


def question_source(root: Path, config: dict[str, Any]) -> QuestionSource:
    """`task.data.eval`: {kind, file, image_folder?, use_ocr?, max_new_tokens?}; paths relative to root."""
    config = dict(config)
    kind = config.pop("kind", None)
    if kind not in QUESTION_SOURCES:
        raise ConfigError(f"task.data.eval.kind: expected one of {sorted(QUESTION_SOURCES)}, got {kind!r}")
    if "file" not in config:
        raise ConfigError(f"task.data.eval.file: the {kind} question file (relative to task.data.root)")
    config["file"] = root / config["file"]
    if "image_folder" in config:
        config["image_folder"] = root / config["image_folder"]
    try:
        return QUESTION_SOURCES[kind](**config)
    except TypeError as err:
        raise ConfigError(f"task.data.eval ({kind}): {err}") from err


class QuestionDataset(Dataset):
    def __init__(
        self, questions: list[Question], tokenizer: Any, template: Template, processor: ImageProcessor
    ):
        self.items, self.tokenizer, self.template, self.processor = questions, tokenizer, template, processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: SampleKey | int) -> dict[str, Any]:
        question = self.items[key.index if isinstance(key, SampleKey) else int(key)]
        image = None
        if isinstance(question.image, bytes):
            image = self.processor(Image.open(io.BytesIO(question.image)).convert("RGB"))
        elif question.image is not None:
            if not Path(question.image).is_file():
                raise DataError(f"question {question.meta}: image file {question.image} does not exist")
            image = self.processor(load_rgb(str(question.image)))
        ids = generation_prompt(question.text, image is not None, self.template, self.tokenizer)
        return {"input_ids": torch.tensor(ids), "image": image, "meta": question.meta}


@dataclass
class QuestionBatch(PromptBatch):
    """Left-padded prompts (generation appends at the right edge of every row) and their metadata."""

    metas: list[dict[str, Any]]


def collate_questions(items: list[dict[str, Any]], pad_id: int) -> QuestionBatch:
    return QuestionBatch.pad_items(items, pad_id, left=True, metas=[item["meta"] for item in items])
