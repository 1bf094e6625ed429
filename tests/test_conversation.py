"""LLaVA conversation templates: label masking, placeholder checks, truncation and the tokenizer rules,
checked on hand-written samples with a word-level tokenizer whose ids are known."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from piip.data.llava.conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    TEMPLATES,
    Conversation,
    ConversationError,
    encode,
    generation_prompt,
)
from piip.data.llava.dataset import load_tokenizer
from piip.errors import ConfigError

_TEXT = (
    "a chat between curious human and an artificial intelligence assistant . the gives helpful , detailed "
    "polite answers to 's questions user : what colour is circle ? red how many shapes 3 describe image "
    "blue star s"
)
WORDS = ["<unk>", "<s>", "</s>"] + sorted(set(_TEXT.split()) | {"assistant"})


def make_tokenizer(pad: bool = False, unk: bool = True) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(WORDS)}
    model = models.WordLevel(vocab=vocab, unk_token="<unk>")
    backend = Tokenizer(model)
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = {"bos_token": "<s>", "eos_token": "</s>"}
    if unk:
        specials["unk_token"] = "<unk>"
    if pad:
        specials["pad_token"] = "<unk>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def ids(text: str) -> list[int]:
    vocab = {w: i for i, w in enumerate(WORDS)}
    return [vocab[w] for w in text.lower().split()]


SAMPLE = {
    "id": "s1",
    "image": "a.png",
    "conversations": [
        {"from": "human", "value": "what colour is the circle ?\n<image>"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "how many shapes ?"},
        {"from": "gpt", "value": "3"},
    ],
}


def test_vicuna_labels_cover_exactly_the_answers_and_their_eos() -> None:
    tokenizer = make_tokenizer()
    encoded = encode(Conversation.from_llava(SAMPLE, "x.json"), TEMPLATES["vicuna_v1"], tokenizer, 2048, 5)
    system = (
        "a chat between a curious human and an artificial intelligence assistant . the assistant gives "
        "helpful , detailed , and polite answers to the human ' s questions ."
    )
    # Whitespace pre-tokenisation splits "human's" into human ' s; "'" is unknown -> <unk> (id 0)
    system_ids = [0 if w == "'" else ids(w)[0] for w in system.split()]
    eos = 2
    expected_ids = (
        [1]
        + system_ids
        + ids("USER :")
        + [IMAGE_TOKEN_INDEX]
        + ids("what colour is the circle ?")
        + ids("ASSISTANT :")
        + ids("red")
        + [eos]
        + ids("USER : how many shapes ? ASSISTANT :")
        + ids("3")
        + [eos]
    )
    assert encoded.input_ids == expected_ids
    answer_positions = {i for i, t in enumerate(expected_ids) if t in (ids("red")[0], ids("3")[0], eos)}
    for i, (token, label) in enumerate(zip(encoded.input_ids, encoded.labels, strict=True)):
        assert label == (token if i in answer_positions else IGNORE_INDEX), f"position {i}"
    assert not encoded.truncated and encoded.has_image


def test_plain_template_is_image_then_caption_with_the_instruction_dropped() -> None:
    tokenizer = make_tokenizer()
    sample = {
        "id": "c",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "describe the image\n<image>"},
            {"from": "gpt", "value": "a red circle"},
        ],
    }
    encoded = encode(Conversation.from_llava(sample, "p.json"), TEMPLATES["plain"], tokenizer, 2048, 4)
    assert encoded.input_ids == [1, IMAGE_TOKEN_INDEX, *ids("a red circle")]
    assert encoded.labels == [IGNORE_INDEX, IGNORE_INDEX, *ids("a red circle")]


def test_text_only_sample_has_no_placeholder() -> None:
    sample = {
        "id": "t",
        "conversations": [
            {"from": "human", "value": "what colour is red ?"},
            {"from": "gpt", "value": "red"},
        ],
    }
    encoded = encode(
        Conversation.from_llava(sample, "t.json"), TEMPLATES["vicuna_v1"], make_tokenizer(), 2048, 9
    )
    assert IMAGE_TOKEN_INDEX not in encoded.input_ids
    assert [
        t for t, lab in zip(encoded.input_ids, encoded.labels, strict=True) if lab != IGNORE_INDEX
    ] == ids("red") + [2]


@pytest.mark.parametrize(
    ("sample", "message"),
    [
        (
            {
                "id": "1",
                "image": "a.png",
                "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}],
            },
            "0 <image>",
        ),
        (
            {
                "id": "2",
                "conversations": [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "x"}],
            },
            "no 'image'",
        ),
        (
            {
                "id": "3",
                "image": "a.png",
                "conversations": [
                    {"from": "human", "value": "<image> <image>"},
                    {"from": "gpt", "value": "x"},
                ],
            },
            "2 <image>",
        ),
        ({"id": "4", "conversations": [{"from": "gpt", "value": "x"}]}, "message 0 should be from 'human'"),
        ({"id": "5", "conversations": []}, "non-empty 'conversations'"),
    ],
)
def test_malformed_samples_are_refused_with_file_and_id(sample: dict, message: str) -> None:
    with pytest.raises(ConversationError, match=message) as err:
        Conversation.from_llava(sample, "data/train.json")
    assert "data/train.json" in str(err.value) and f"sample {sample['id']}" in str(err.value)


def test_truncation_drops_whole_turns_and_keeps_answers_complete() -> None:
    tokenizer = make_tokenizer()
    conversation = Conversation.from_llava(SAMPLE, "x.json")
    full = encode(conversation, TEMPLATES["vicuna_v1"], tokenizer, 2048, 5)
    first_turn_length = full.input_ids.index(2) + 1  # up to and including the first answer's eos
    visual = 5
    encoded = encode(
        conversation, TEMPLATES["vicuna_v1"], tokenizer, first_turn_length + visual - 1 + 3, visual
    )
    assert encoded.truncated
    assert encoded.input_ids == full.input_ids[:first_turn_length]
    assert encoded.labels == full.labels[:first_turn_length]
    assert len(encoded.input_ids) + visual - 1 <= first_turn_length + visual - 1 + 3


def test_truncation_that_would_cut_the_image_is_an_error() -> None:
    conversation = Conversation.from_llava(SAMPLE, "x.json")
    with pytest.raises(ConversationError, match="max_length"):
        encode(conversation, TEMPLATES["vicuna_v1"], make_tokenizer(), 10, 5)


def test_generation_prompt_ends_with_the_assistant_role() -> None:
    prompt = generation_prompt("how many shapes ?", True, TEMPLATES["vicuna_v1"], make_tokenizer())
    assert prompt[-2:] == ids("ASSISTANT :")
    assert prompt.count(IMAGE_TOKEN_INDEX) == 1
    image_at = prompt.index(IMAGE_TOKEN_INDEX)
    assert prompt[image_at - 2 : image_at] == ids("USER :")  # the image comes first in the human turn


def test_tokenizer_without_pad_pads_with_unk(tmp_path: Path) -> None:
    make_tokenizer().save_pretrained(tmp_path / "tok")
    tokenizer = load_tokenizer(tmp_path / "tok")
    assert tokenizer.pad_token_id == tokenizer.unk_token_id == 0


def test_tokenizer_without_pad_or_unk_and_missing_folder_are_refused(tmp_path: Path) -> None:
    make_tokenizer(unk=False).save_pretrained(tmp_path / "tok")
    with pytest.raises(ConfigError, match="neither a pad nor an unk"):
        load_tokenizer(tmp_path / "tok")
    with pytest.raises(ConfigError, match="task.data.tokenizer: tokenizer folder .* does not exist"):
        load_tokenizer(tmp_path / "missing")
