"""LLaVA data: the conversation format and its templates, training samples, evaluation question sets, and
the DataModule that serves both."""

from piip.data.llava.datamodule import LlavaDataModule
from piip.data.llava.dataset import (
    ConversationBatch,
    ConversationDataset,
    ImageProcessor,
    PromptBatch,
    collate_conversations,
    load_tokenizer,
    read_samples,
)
from piip.data.llava.questions import (
    QUESTION_SOURCES,
    HeldOutConversations,
    QuestionBatch,
    QuestionDataset,
    collate_questions,
    question_source,
)

__all__ = [
    "QUESTION_SOURCES",
    "ConversationBatch",
    "ConversationDataset",
    "HeldOutConversations",
    "ImageProcessor",
    "LlavaDataModule",
    "PromptBatch",
    "QuestionBatch",
    "QuestionDataset",
    "collate_conversations",
    "collate_questions",
    "load_tokenizer",
    "question_source",
    "read_samples",
]
