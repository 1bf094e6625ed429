"""LLaVA data: JSON conversations for training, and question sets (held-out conversations, TextVQA, MMBench)
answered by greedy generation for evaluation.

Training samples are the LLaVA JSON format (`id`, optional `image` relative to `image_folder`,
`conversations` of alternating `human`/`gpt` turns), read once and tokenised lazily per sample
(`piip.data.llava.conversation.encode`). Images follow PAPER.md §6.2: padded to a square with the mean colour
(`image_aspect_ratio=pad`, LLaVA-1.5's expand-to-square) or resized and centre-cropped (`crop`, the CLIP
processor's default), resized to the highest branch resolution and normalised with ImageNet statistics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from piip.data.base import load_rgb
from piip.data.llava.conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    Conversation,
    ConversationError,
    Template,
    encode,
)
from piip.data.sampling import SampleKey
from piip.data.validate import read_json
from piip.errors import ConfigError, DataError

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
    """A LLaVA JSON file (UTF-8; errors name the file, and the byte offset of text that is not UTF-8)."""
    samples = read_json(path, "conversation file (LLaVA JSON: a list of samples)")
    if not isinstance(samples, list):
        raise DataError(f"{path}: expected a JSON list of samples, got {type(samples).__name__}")
    return samples


def check_conversations(samples: list[dict[str, Any]], file: Path, template: Template) -> None:
    """Every sample parses (`Conversation.from_llava`) and has an answer to train on, checked at set-up: a
    batch of samples without answers has every label masked, and its loss is NaN."""
    for i, sample in enumerate(samples):
        if not isinstance(sample, dict):
            raise DataError(
                f"{file}: sample {i} (0-based) is a JSON {type(sample).__name__}; expected an object"
            )
    unanswered = [
        c.id for c in (Conversation.from_llava(s, str(file)) for s in samples) if not c.has_answer(template)
    ]
    if unanswered:
        shown = ", ".join(unanswered[:5]) + (", ..." if len(unanswered) > 5 else "")
        turn = "its first question" if template.name == "plain" else "any question"
        raise DataError(
            f"{file}: {len(unanswered)} of {len(samples)} samples have no answer to train on (no 'gpt' "
            f"message after {turn}, template {template.name}): {shown}; add their answers or remove them"
        )


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
        check_conversations(self.samples, file, template)
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
