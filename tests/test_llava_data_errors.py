"""LLaVA data errors say what is wrong, where: a file that is not UTF-8 (with the byte offset), an `<image>`
placeholder in an answer (sample and message, not "raise max_length"), samples without answers (their ids and
count, not "lower the learning rate"), all when the training set is built, i.e. at set-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from piip.data.llava.conversation import TEMPLATES, Conversation
from piip.data.llava.dataset import ConversationDataset, ImageProcessor
from piip.data.llava.questions import HeldOutConversations
from piip.errors import DataError
from tests.test_conversation import make_tokenizer

ANSWERED = [
    {"from": "human", "value": "<image>\nwhat colour is the circle ?"},
    {"from": "gpt", "value": "red"},
]


def conversations(tmp_path: Path, samples: list | bytes, template: str = "vicuna_v1") -> ConversationDataset:
    file = tmp_path / "train.json"
    file.write_bytes(samples if isinstance(samples, bytes) else json.dumps(samples).encode())
    (tmp_path / "images").mkdir(exist_ok=True)
    Image.new("RGB", (20, 10)).save(tmp_path / "images" / "a.png")
    tokenizer = make_tokenizer(pad=True)
    return ConversationDataset(
        file, tmp_path / "images", tokenizer, TEMPLATES[template], 2048, 4, ImageProcessor(16)
    )


def test_a_file_that_is_not_utf8_names_the_file_and_the_byte_offset(tmp_path: Path) -> None:
    latin1 = '[{"id": "a", "conversations": [{"from": "human", "value": "café ?"}]}]'.encode("latin-1")
    offset = latin1.index("é".encode("latin-1"))
    for build in (
        lambda: conversations(tmp_path, latin1),
        lambda: HeldOutConversations(tmp_path / "train.json", tmp_path / "images").questions(),
    ):
        with pytest.raises(DataError) as err:
            build()
        assert str(err.value).startswith(f"{tmp_path / 'train.json'} is not UTF-8 text: byte offset {offset}")


def test_an_image_placeholder_in_an_answer_names_the_sample_and_message(tmp_path: Path) -> None:
    turns = [
        ANSWERED[0],
        ANSWERED[1],
        {"from": "human", "value": "and now ?"},
        {"from": "gpt", "value": "<image>"},
    ]
    sample = {"id": "q9", "image": "a.png", "conversations": [turns[0] | {"value": "what ?"}, *turns[1:]]}
    with pytest.raises(DataError) as err:
        conversations(tmp_path, [sample])  # refused when the training set is built, not when drawn
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'train.json'}: sample q9: message 3 (the answer of turn 1) holds")
    assert "<image> placeholder; it belongs in a human turn" in message and "max_length" not in message


def test_samples_without_answers_are_named_with_their_count_and_file(tmp_path: Path) -> None:
    question_only = [{"from": "human", "value": "how many shapes ?"}]
    samples = [
        {"id": "ok", "image": "a.png", "conversations": ANSWERED},
        {"id": "n1", "conversations": question_only},
        {"id": "n2", "conversations": question_only},
    ]
    with pytest.raises(DataError) as err:
        conversations(tmp_path, samples)
    assert str(err.value) == (
        f"{tmp_path / 'train.json'}: 2 of 3 samples have no answer to train on (no 'gpt' message after any "
        "question, template vicuna_v1): n1, n2; add their answers or remove them"
    )
    assert "learning rate" not in str(err.value)
    assert len(conversations(tmp_path, samples[:1])) == 1  # answered samples pass


def test_a_sample_that_is_not_an_object_names_its_index(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"train.json: sample 1 \(0-based\) is a JSON list; expected an object"
    ):
        conversations(tmp_path, [{"id": "ok", "image": "a.png", "conversations": ANSWERED}, ["human", "hi"]])


def test_has_answer_follows_what_the_template_trains_on() -> None:
    vicuna, plain = TEMPLATES["vicuna_v1"], TEMPLATES["plain"]
    sample = {"id": "s", "conversations": [{"from": "human", "value": "hi"}]}
    conversation = Conversation.from_llava(sample, "x.json")
    assert not conversation.has_answer(vicuna) and not conversation.has_answer(plain)
    sample["conversations"] += [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "bye"}]
    conversation = Conversation.from_llava(sample, "x.json")
    assert conversation.has_answer(vicuna) and conversation.has_answer(plain)
