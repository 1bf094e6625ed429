"""LLaVA data: conversation loading errors, truncation counting, length grouping, image padding, question
sources scored through their metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from piip.data.llava.conversation import TEMPLATES, ConversationError
from piip.data.llava.dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ConversationDataset,
    ImageProcessor,
    collate_conversations,
)
from piip.data.llava.questions import question_source
from piip.data.sampling import ResumableSampler
from piip.errors import ConfigError, DataError
from piip.evaluation.textvqa import TextVQA
from tests.test_conversation import make_tokenizer

TURNS = [
    {"from": "human", "value": "<image>\nwhat colour is the circle ?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "how many shapes ?"},
    {"from": "gpt", "value": "3"},
]


def dataset(tmp_path: Path, samples: list[dict], max_length: int = 2048) -> ConversationDataset:
    file = tmp_path / "train.json"
    file.write_text(json.dumps(samples))
    (tmp_path / "images").mkdir(exist_ok=True)
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "images" / "a.png")
    return ConversationDataset(
        file,
        tmp_path / "images",
        make_tokenizer(pad=True),
        TEMPLATES["vicuna_v1"],
        max_length,
        4,
        ImageProcessor(16),
    )


def test_a_missing_image_names_the_file_the_sample_and_the_folder(tmp_path: Path) -> None:
    data = dataset(tmp_path, [{"id": "x7", "image": "gone.png", "conversations": TURNS}])
    with pytest.raises(
        DataError, match=r"train.json: sample x7 names image 'gone.png'.*task.data.image_folder"
    ):
        data[0]


def test_truncated_conversations_are_flagged_and_counted_per_batch(tmp_path: Path) -> None:
    samples = [{"id": "a", "image": "a.png", "conversations": TURNS}, {"id": "b", "conversations": TURNS[2:]}]
    full = dataset(tmp_path, samples)
    short_length = len(full[0]["input_ids"]) + 4 - 1 - 2  # 2 tokens too long once the 4 visual tokens are in
    short = dataset(tmp_path, samples, max_length=short_length)
    assert short[0]["truncated"] and not short[1]["truncated"]
    batch = collate_conversations([short[0], short[1]], pad_id=0)
    assert batch.truncated == 1
    assert batch.images.shape == (1, 3, 16, 16) and batch.has_image.tolist() == [True, False]
    assert batch.labels[1, len(short[1]["labels"]) :].eq(-100).all()  # padding is never trained on


def test_an_image_cut_off_by_truncation_is_an_error_naming_the_file(tmp_path: Path) -> None:
    data = dataset(tmp_path, [{"id": "a", "image": "a.png", "conversations": TURNS}], max_length=6)
    with pytest.raises(ConversationError, match=r"train.json: sample a: max_length 6"):
        data[0]


def test_length_grouping_sorts_within_groups_and_stays_a_per_epoch_permutation() -> None:
    lengths = [5, 1, 9, 3, 7, 2, 8, 4]
    sampler = ResumableSampler(8, shuffle=True, seed=3)
    sampler.group_by(lengths, 4)
    order = [key.index for key in sampler]
    assert sorted(order) == list(range(8))
    for group in (order[:4], order[4:]):
        assert [lengths[i] for i in group] == sorted((lengths[i] for i in group), reverse=True)
    assert [key.index for key in sampler] == order  # same epoch, same order: resumable
    sampler.set_epoch(1)
    assert [key.index for key in sampler] != order


def test_padding_to_square_fills_with_the_mean_colour(tmp_path: Path) -> None:
    image = Image.new("RGB", (20, 10), (255, 0, 0))
    pixels = ImageProcessor(20, "pad")(image)
    assert pixels.shape == (3, 20, 20)
    mean_colour = [(round(m * 255) / 255 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    torch.testing.assert_close(pixels[:, 0, 10], torch.tensor(mean_colour), atol=0.02, rtol=0)  # top band
    red = [(1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], -IMAGENET_MEAN[1] / IMAGENET_STD[1]]
    torch.testing.assert_close(pixels[:2, 10, 10], torch.tensor(red), atol=0.02, rtol=0)  # the image itself


def test_textvqa_source_builds_ocr_prompts_and_scores_ten_answers(tmp_path: Path) -> None:
    entry = {
        "question_id": 7,
        "image_id": "img",
        "question": "what colour is the star?",
        "answers": ["red"] * 2 + ["dark red"] * 8,
        "ocr_tokens": ["star", "circle"],
    }
    (tmp_path / "tv.json").write_text(json.dumps({"data": [entry]}))
    source = question_source(tmp_path, {"kind": "textvqa", "file": "tv.json", "image_folder": "imgs"})
    assert isinstance(source, TextVQA)
    (question,) = source.questions()
    assert question.text == (
        "what colour is the star?\nReference OCR token: star, circle\n"
        "Answer the question using a single word or phrase."
    )
    assert question.image == tmp_path / "imgs" / "img.jpg"
    metric = source.metric()
    source.update(metric, [question.meta], ["Red."])
    # "red" matches 2 of 10 annotators: those two see 1 other match (1/3), the eight see 2 (2/3) -> 0.6
    assert metric.compute()["accuracy"] == pytest.approx(0.6)


def test_unknown_question_source_is_refused() -> None:
    with pytest.raises(ConfigError, match="task.data.eval.kind"):
        question_source(Path("."), {"kind": "vqav2", "file": "x"})
    with pytest.raises(ConfigError, match="task.data.eval.file"):
        question_source(Path("."), {"kind": "textvqa"})
