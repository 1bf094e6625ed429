"""LLaVA data: JSON conversations for training, and question sets (held-out conversations, TextVQA, MMBench)
answered by greedy generation for evaluation.

Training samples are the LLaVA JSON format (`id`, optional `image` relative to `image_folder`,
`conversations` of alternating `human`/`gpt` turns), read once and tokenised lazily per sample
(`piip.data.conversation.encode`). Images follow PAPER.md §6.2: padded to a square with the mean colour
(`image_aspect_ratio=pad`, LLaVA-1.5's expand-to-square) or resized and centre-cropped (`crop`, the CLIP
processor's default), resized to the highest branch resolution and normalised with ImageNet statistics.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from piip.data.base import ResumableDataModule
from piip.data.conversation import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_INDEX,
    TEMPLATES,
    Conversation,
    ConversationError,
    Template,
    encode,
    generation_prompt,
)
from piip.data.imagenet import DataError, load_rgb
from piip.data.sampling import ResumableSampler, SampleKey
from piip.metrics.mmbench import MMBenchCircular, circular_rounds, mmbench_prompt, read_mmbench_tsv
from piip.metrics.vqa import AnswerAccuracy, VQAAccuracy, textvqa_prompt
from piip.models.config import ConfigError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# -- tokenizer and images ---------------------------------------------------------------------------------
def load_tokenizer(path: str | Path, field_name: str = "task.data.tokenizer") -> Any:
    """A local Hugging Face tokenizer. Without a pad token, pad = unk (as LLaVA does for LLaMA/Vicuna):
    padded positions are masked in attention and labels, so the choice never reaches the loss."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(
            f"{field_name}: tokenizer folder {path} does not exist (a local Hugging Face folder)"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token_id is None:
        if tokenizer.unk_token_id is None:
            raise ConfigError(
                f"{field_name}: the tokenizer at {path} has neither a pad nor an unk token; add a pad token "
                "to its special_tokens_map.json"
            )
        tokenizer.pad_token = tokenizer.unk_token
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{field_name}: the tokenizer at {path} has no eos token; answers could not end")
    return tokenizer


@dataclass(frozen=True)
class ImageProcessor:
    """PIL image -> normalised (3, size, size) float tensor."""

    size: int
    aspect: str = "pad"  # pad | crop
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.aspect not in ("pad", "crop"):
            raise ConfigError(f"task.data.image_aspect_ratio: expected pad or crop, got {self.aspect!r}")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if self.aspect == "pad":
            image = self._expand_to_square(image)
        tensor = TF.pil_to_tensor(image)
        tensor = TF.resize(tensor, self.size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        tensor = TF.center_crop(tensor, [self.size, self.size])
        return TF.normalize(tensor.float() / 255.0, list(self.mean), list(self.std))

    def _expand_to_square(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if width == height:
            return image
        side = max(width, height)
        fill = tuple(int(round(m * 255)) for m in self.mean)
        square = Image.new("RGB", (side, side), fill)
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        return square


# -- training conversations -------------------------------------------------------------------------------
def read_samples(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DataError(f"conversation file not found: {path} (LLaVA JSON: a list of samples)")
    try:
        samples = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(samples, list):
        raise DataError(f"{path}: expected a JSON list of samples, got {type(samples).__name__}")
    return samples


class ConversationDataset(Dataset):
    """One LLaVA JSON file; each item is tokenised and its image loaded when it is drawn."""

    def __init__(
        self,
        file: Path,
        image_folder: Path,
        tokenizer: Any,
        template: Template,
        max_length: int,
        visual_tokens: int,
        processor: ImageProcessor,
    ) -> None:
        self.file = file
        self.samples = read_samples(file)
        self.image_folder = image_folder
        self.tokenizer = tokenizer
        self.template = template
        self.max_length = max_length
        self.visual_tokens = visual_tokens
        self.processor = processor

    def __len__(self) -> int:
        return len(self.samples)

    def length(self, index: int) -> int:
        """Rough length for grouping (words + visual tokens), cheap enough for every sample at start."""
        sample = self.samples[index]
        words = sum(len(str(m.get("value", "")).split()) for m in sample.get("conversations", []))
        return words + (self.visual_tokens if "image" in sample else 0)

    def __getitem__(self, key: SampleKey | int) -> dict[str, Any]:
        index = key.index if isinstance(key, SampleKey) else int(key)
        conversation = Conversation.from_llava(self.samples[index], str(self.file))  # errors name the file
        try:
            encoded = encode(conversation, self.template, self.tokenizer, self.max_length, self.visual_tokens)
        except ConversationError as err:
            raise ConversationError(f"{self.file}: {err}") from err
        image = None
        if conversation.image is not None:
            image = self.processor(self._load_image(conversation))
        return {
            "input_ids": torch.tensor(encoded.input_ids),
            "labels": torch.tensor(encoded.labels),
            "image": image,
            "truncated": encoded.truncated,
        }

    def _load_image(self, conversation: Conversation) -> Image.Image:
        path = self.image_folder / conversation.image
        if not path.is_file():
            raise DataError(
                f"{self.file}: sample {conversation.id} names image {conversation.image!r}, but {path} "
                "does not exist (check task.data.image_folder)"
            )
        return load_rgb(str(path))


def pad(sequences: list[torch.Tensor], value: int, left: bool = False) -> torch.Tensor:
    """(B, L): right-padded for training, left-padded for generation (every row continues at one column)."""
    return pad_sequence(
        sequences, batch_first=True, padding_value=value, padding_side="left" if left else "right"
    )


@dataclass
class PromptBatch:
    """Padded token ids with their mask, and the images of the rows that have one, in row order."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    images: torch.Tensor | None

    @classmethod
    def pad_items(cls, items: list[dict[str, Any]], pad_id: int, left: bool, **fields: Any) -> Any:
        ids = [item["input_ids"] for item in items]
        images = [item["image"] for item in items if item["image"] is not None]
        return cls(
            input_ids=pad(ids, pad_id, left),
            attention_mask=pad([torch.ones_like(i, dtype=torch.bool) for i in ids], 0, left),
            images=torch.stack(images) if images else None,
            **fields,
        )

    @property
    def has_image(self) -> torch.Tensor:
        return (self.input_ids == IMAGE_TOKEN_INDEX).any(dim=1)

    @property
    def num_samples(self) -> int:
        return len(self.input_ids)


@dataclass
class ConversationBatch(PromptBatch):
    """Right-padded training rows with their labels and how many were truncated."""

    labels: torch.Tensor
    truncated: int = 0


def collate_conversations(items: list[dict[str, Any]], pad_id: int) -> ConversationBatch:
    return ConversationBatch.pad_items(
        items,
        pad_id,
        left=False,
        labels=pad([item["labels"] for item in items], IGNORE_INDEX),
        truncated=sum(bool(item["truncated"]) for item in items),
    )


# -- evaluation question sets -----------------------------------------------------------------------------
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
        """A fresh accumulator with update/compute/state/merge/records (piip.metrics)."""

    @abstractmethod
    def update(self, metric: Any, metas: list[dict[str, Any]], answers: list[str]) -> None: ...


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


class TextVQA(QuestionSource):
    """TextVQA annotation JSON (`data`: question_id, image_id, question, answers, ocr_tokens), scored with
    the ten-annotator VQA accuracy; `use_ocr` adds the OCR tokens to the prompt (LLaVA-1.5's protocol)."""

    name = "textvqa"

    def __init__(
        self, file: Path, image_folder: Path, use_ocr: bool = True, max_new_tokens: int = 16
    ) -> None:
        self.file, self.image_folder = file, image_folder
        self.use_ocr, self.max_new_tokens = use_ocr, max_new_tokens

    def questions(self) -> list[Question]:
        if not self.file.is_file():
            raise DataError(f"TextVQA annotation file not found: {self.file}")
        entries = json.loads(self.file.read_text()).get("data")
        if not isinstance(entries, list):
            raise DataError(f"{self.file}: expected a TextVQA annotation file with a 'data' list")
        out = []
        for entry in entries:
            image_file = entry.get("image_file") or f"{entry['image_id']}.jpg"
            text = textvqa_prompt(entry["question"], entry.get("ocr_tokens"), self.use_ocr)
            meta = {"question_id": entry["question_id"], "answers": list(entry.get("answers", []))}
            out.append(Question(text, self.image_folder / image_file, meta))
        return out

    def metric(self) -> VQAAccuracy:
        return VQAAccuracy()

    def update(self, metric: VQAAccuracy, metas: list[dict[str, Any]], answers: list[str]) -> None:
        metric.update([m["question_id"] for m in metas], answers, [m["answers"] for m in metas])


class MMBench(QuestionSource):
    """MMBench TSV; every question is asked once per option rotation (circular evaluation)."""

    name = "mmbench"

    def __init__(self, file: Path, max_new_tokens: int = 8) -> None:
        self.file, self.max_new_tokens = file, max_new_tokens

    def questions(self) -> list[Question]:
        out = []
        for question in read_mmbench_tsv(self.file):
            image = base64.b64decode(question.image_base64) if question.image_base64 else None
            for round_ in circular_rounds(question):
                meta = {
                    "index": question.index,
                    "round": round_.round,
                    "letter": round_.answer,
                    "options": round_.options,
                    "category": question.category,
                }
                out.append(Question(mmbench_prompt(round_, question.hint), image, meta))
        return out

    def metric(self) -> MMBenchCircular:
        return MMBenchCircular()

    def update(self, metric: MMBenchCircular, metas: list[dict[str, Any]], answers: list[str]) -> None:
        metric.update(
            [m["index"] for m in metas],
            [m["round"] for m in metas],
            answers,
            [m["letter"] for m in metas],
            [m["category"] for m in metas],
            options=[m["options"] for m in metas],
        )


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


# -- the DataModule ---------------------------------------------------------------------------------------
class LlavaDataModule(ResumableDataModule):
    """Training conversations (`train_file`) and an evaluation question set (`eval`), sharing one
    tokenizer, template and image processing.

    `visual_tokens` (how many tokens one image becomes) is set by the task before loaders are built, so
    truncation to `max_length` accounts for them. With `synthetic` set, the embedded shapes data and its
    tiny language model are written to `root` when this module is created — before the model, which loads
    that language model.
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
            from piip.data.synthetic_llava import ensure_llava_layout

            ensure_llava_layout(self.root, **synthetic)
        self.tokenizer = load_tokenizer(tokenizer)
        self.template = TEMPLATES[template]
        self.train_file = self.root / train_file
        self.image_folder = self.root / image_folder
        self.max_length = max_length
        self.processor = ImageProcessor(input_size, image_aspect_ratio)
        self.group_by_length = group_by_length
        self.source = question_source(self.root, eval)
        self.visual_tokens: int | None = None
        self._train: ConversationDataset | None = None

    def collate_fn(self, items: list[dict[str, Any]]) -> ConversationBatch | QuestionBatch:
        if "labels" in items[0]:
            return collate_conversations(items, self.tokenizer.pad_token_id)
        return collate_questions(items, self.tokenizer.pad_token_id)

    def train_dataset(self) -> ConversationDataset:
        if self.visual_tokens is None:
            raise RuntimeError(
                "LlavaDataModule.visual_tokens is unset: the MultimodalTask sets it in setup()"
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
        return QuestionDataset(self.source.questions(), self.tokenizer, self.template, self.processor)

    def _sampler(self, size: int, train: bool) -> ResumableSampler:
        sampler = super()._sampler(size, train)
        if train and self.group_by_length:
            dataset = self.train_dataset()
            world = self.trainer.world_size if self.trainer is not None else 1
            sampler.group_by([dataset.length(i) for i in range(size)], self.batch_size * world)
        return sampler
