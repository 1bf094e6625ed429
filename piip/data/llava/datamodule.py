"""`LlavaDataModule`: LLaVA JSON conversations for training and a question set for evaluation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from piip.data.base import ResumableDataModule
from piip.data.llava.conversation import TEMPLATES
from piip.data.llava.dataset import (
    ConversationBatch,
    ConversationDataset,
    ImageProcessor,
    collate_conversations,
    load_tokenizer,
)
from piip.data.llava.questions import QuestionBatch, QuestionDataset, collate_questions, question_source
from piip.data.sampling import ResumableSampler
from piip.errors import ConfigError
from piip.evaluation.questions import QuestionSource

log = logging.getLogger(__name__)


class LlavaDataModule(ResumableDataModule):
    """Training conversations (`train_file`) and an evaluation question set (`eval`), sharing one
    tokenizer, template and image processing.

    `visual_tokens` (how many tokens one image becomes) comes from the task through `fit_to_task` before
    loaders are built, so truncation to `max_length` accounts for them. With `synthetic` set, the embedded
    shapes data and its tiny language model are written to `root` when this module is created — before the
    model, which loads that language model.
    """

    def __init__(
        self,
        root: str,
        input_size: int,
        tokenizer: str,
        eval: dict[str, Any],
        train_file: str = "train.json",
        image_folder: str = "images",
        template: str = "vicuna_v1",
        max_length: int = 2048,
        image_aspect_ratio: str = "pad",
        group_by_length: bool = True,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        seed: int = 0,
        synthetic: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, pin_memory, persistent_workers, seed)
        if template not in TEMPLATES:
            raise ConfigError(f"task.data.template: expected one of {sorted(TEMPLATES)}, got {template!r}")
        self.root = Path(root)
        if synthetic is not None:
            from piip.data.synthetic.llava import ensure_llava_layout

            ensure_llava_layout(self.root, **synthetic)
        self.tokenizer = load_tokenizer(tokenizer)
        self.template = TEMPLATES[template]
        self.train_file = self.root / train_file
        self.image_folder = self.root / image_folder
        self.max_length = max_length
        self.processor = ImageProcessor(input_size, image_aspect_ratio)
        self.group_by_length = group_by_length
        self.question_source: QuestionSource = question_source(self.root, eval)
        self.visual_tokens: int | None = None
        self._train: ConversationDataset | None = None

    def fit_to_task(
        self, visual_tokens: int | None = None, max_positions: int | None = None, **_: Any
    ) -> None:
        """Each image becomes `visual_tokens` tokens; the prompt may not outgrow the LM's `max_positions`."""
        self.visual_tokens = visual_tokens
        if max_positions is not None and self.max_length > max_positions:
            raise ConfigError(
                f"task.data.max_length={self.max_length} exceeds the language model's "
                f"max_position_embeddings={max_positions}; lower task.data.max_length"
            )

    def collate_fn(self, items: list[dict[str, Any]]) -> ConversationBatch | QuestionBatch:
        if "labels" in items[0]:
            return collate_conversations(items, self.tokenizer.pad_token_id)
        return collate_questions(items, self.tokenizer.pad_token_id)

    def train_dataset(self) -> ConversationDataset:
        if self.visual_tokens is None:
            raise RuntimeError(
                "LlavaDataModule.visual_tokens is unset: piip.run.build.connect passes the task's "
                "(fit_to_task)"
            )
        if self._train is None:
            self._train = ConversationDataset(
                self.train_file,
                self.image_folder,
                self.tokenizer,
                self.template,
                self.max_length,
                self.visual_tokens,
                self.processor,
            )
        return self._train

    def val_dataset(self) -> QuestionDataset:
        return QuestionDataset(
            self.question_source.questions(), self.tokenizer, self.template, self.processor
        )

    def _sampler(self, size: int, train: bool) -> ResumableSampler:
        sampler = super()._sampler(size, train)
        if train and self.group_by_length:
            dataset = self.train_dataset()
            world = self.trainer.world_size if self.trainer is not None else 1
            sampler.group_by([dataset.length(i) for i in range(size)], self.batch_size * world)
        return sampler
