"""A tiny, randomly initialised Llama language model with a word-level tokenizer, built offline.

The LLaVA quick start needs a causal language model and a tokenizer without any download. This module
builds both from the texts a dataset contains: the vocabulary is every word (after normalisation) of those
texts plus the fixed strings of the conversation templates, so nothing the trainer writes maps to `<unk>`.

Tokenizer (Hugging Face `tokenizers`, wrapped in `transformers`' fast tokenizer and saved as
`tokenizer.json` + `tokenizer_config.json`):

- normaliser NFD -> strip accents -> lower-case; pre-tokeniser `Whitespace` (runs of word characters, and
  runs of punctuation, each become one word; whitespace, newlines included, only separates);
- a `WordLevel` model: `<unk>` = 0, `<s>` (bos) = 1, `</s>` (eos) = 2, then the words sorted by code point;
- no decoder, so decoding joins the tokens with single spaces: `decode(encode(text)) == normalise(text)`;
- like Llama: `add_special_tokens=True` prepends bos (a `TemplateProcessing` post-processor) and never
  appends eos; `add_special_tokens=False` adds nothing. There is deliberately no pad token (Llama has none;
  LLaVA maps pad to unk).

Model: `LlamaForCausalLM` (untied input/output embeddings) initialised under a fixed torch seed, so the same
arguments give the same weights, saved as `config.json`, `generation_config.json` and `model.safetensors`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "SPECIAL_TOKENS",
    "UNK_TOKEN",
    "normalise",
    "tokenizer_words",
    "write_tiny_language_model",
]

UNK_TOKEN, BOS_TOKEN, EOS_TOKEN = "<unk>", "<s>", "</s>"
SPECIAL_TOKENS: tuple[str, ...] = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2 as in Llama


def _normaliser() -> Any:
    from tokenizers import normalizers

    return normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()])


def _pre_tokeniser() -> Any:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Whitespace()


def tokenizer_words(text: str) -> list[str]:
    """The words (tokens) the tokenizer splits `text` into, before the vocabulary lookup."""
    normalised = _normaliser().normalize_str(text)
    return [word for word, _ in _pre_tokeniser().pre_tokenize_str(normalised)]


def normalise(text: str) -> str:
    """What decoding the encoded `text` gives back: its words joined by single spaces."""
    return " ".join(tokenizer_words(text))


def _vocabulary(texts: Iterable[str]) -> dict[str, int]:
    from piip.data.llava.conversation import template_texts

    words: set[str] = set()
    for text in [*texts, *template_texts()]:
        words.update(tokenizer_words(text))
    words.difference_update(SPECIAL_TOKENS)
    return {token: index for index, token in enumerate([*SPECIAL_TOKENS, *sorted(words)])}


def _build_tokenizer(vocab: dict[str, int]) -> Any:
    from tokenizers import Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    backend.normalizer = _normaliser()
    backend.pre_tokenizer = _pre_tokeniser()
    bos = vocab[BOS_TOKEN]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,
    )


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """`save_pretrained` draws a progress bar per call; generating data should not."""
    from transformers.utils import logging as hf_logging

    was_disabled = hf_logging.is_progress_bar_enabled() is False
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not was_disabled:
            hf_logging.enable_progress_bar()


def _validate(**values: int) -> None:
    for name, value in values.items():
        low = 0 if name == "seed" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if values["hidden_size"] % values["num_heads"]:
        raise ValueError(
            f"hidden_size ({values['hidden_size']}) must be divisible by num_heads ({values['num_heads']})"
        )


def write_tiny_language_model(
    folder: str | os.PathLike[str],
    texts: Iterable[str],
    *,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 512,
    seed: int = 0,
) -> Path:
    """Write a tokenizer whose vocabulary covers `texts` and a random `LlamaForCausalLM` into `folder`
    (created if needed), loadable offline with `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained`.

    Deterministic: the same texts (in any order) and arguments give the same files. The global torch RNG
    state is left as it was."""
    _validate(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        max_positions=max_positions,
        seed=seed,
    )
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _vocabulary(texts)
    tokenizer = _build_tokenizer(vocab)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]), _quiet_progress_bars():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        model.generation_config.pad_token_id = None
        tokenizer.save_pretrained(folder)
        model.save_pretrained(folder)  # transformers 5 always writes safetensors (model.safetensors)
    return folder
