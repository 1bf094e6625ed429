"""LLaVA layout from the synthetic shapes (piip.data.synthetic.llava) and its tiny language model."""

from __future__ import annotations

import base64
import io
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from piip.data.llava.conversation import IMAGE_PLACEHOLDER, Conversation
from piip.data.synthetic import llava as synthetic_llava
from piip.data.synthetic.language_model import normalise, tokenizer_words, write_tiny_language_model
from piip.data.synthetic.llava import (
    EVAL_PROMPTS,
    MMBENCH_COLUMNS,
    ensure_llava_layout,
    majority_baseline,
    write_llava_layout,
)
from piip.data.synthetic.llava_questions import QUESTION_TYPES, question_type, split_prompt
from piip.data.synthetic.llava_scenes import llava_scene, scene_facts
from piip.data.synthetic.publish import MANIFEST_NAME
from piip.data.synthetic.render import render_image
from piip.data.synthetic.scene import SHAPE_CLASSES
from piip.evaluation.mmbench import Round, mmbench_prompt
from piip.evaluation.textvqa import textvqa_prompt
from tests.synthetic_llava_helpers import (
    ARGS,
    HINT,
    SMALL_LM,
    TINY,
    all_texts,
    check_answer,
    load,
    mmbench_rows,
    plain_answer,
    qa_pairs,
    tree_bytes,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llava_layout(tmp_path_factory.mktemp("llava") / "llava", **ARGS)


def test_layout_and_determinism(root: Path, tmp_path: Path) -> None:
    files = tree_bytes(root)
    images = sorted(name for name in files if name.startswith("images/"))
    assert images == [f"images/train_{i:05d}.png" for i in range(12)] + [
        f"images/val_{i:05d}.png" for i in range(6)
    ]
    for name in ("pretrain.json", "finetune.json", "finetune_val.json", "textvqa/TextVQA_val.json"):
        assert name in files
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert f"language_model/{name}" in files
    again = write_llava_layout(tmp_path / "again", **ARGS)
    assert tree_bytes(again) == files
    # Every image is the rendered scene.
    with Image.open(root / "images" / "val_00003.png") as image:
        rendered = render_image(llava_scene(0, "val", 3, 64))
        assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(rendered))
    manifest = load(root, MANIFEST_NAME)
    assert manifest["format"] == "llava" and manifest["counts"]["train"] == 12
    assert manifest["counts"]["finetune"] == len(load(root, "finetune.json"))


def test_ensure_reuses_and_refuses(root: Path, tmp_path: Path) -> None:
    before = (root / MANIFEST_NAME).stat().st_mtime_ns
    assert ensure_llava_layout(root, **ARGS) == root
    assert (root / MANIFEST_NAME).stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="val_images: existing 6, requested 7"):
        ensure_llava_layout(root, **{**ARGS, "val_images": 7})
    with pytest.raises(ValueError, match="language_model"):
        ensure_llava_layout(root, **ARGS, language_model={"hidden_size": 64})
    with pytest.raises(FileExistsError):
        write_llava_layout(root, **ARGS)
    # Generating into a fresh root with a small language model, then reusing it.
    fresh = ensure_llava_layout(tmp_path / "fresh", **TINY)
    assert ensure_llava_layout(fresh, **TINY) == fresh
    (fresh / "images" / "val_00000.png").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        ensure_llava_layout(fresh, **TINY)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        ensure_llava_layout(tmp_path / "foreign", **ARGS)


def publish_while_generating(monkeypatch: pytest.MonkeyPatch, reference: Path, root: Path) -> None:
    """Simulate another rank: `reference` appears at `root` while this process renders its images."""
    real_render = synthetic_llava.render_image

    def render_while_other_rank_finishes(scene):
        if not root.exists():
            shutil.copytree(reference, root)
        return real_render(scene)

    monkeypatch.setattr(synthetic_llava, "render_image", render_while_other_rank_finishes)


def test_concurrent_writer_that_wins_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = write_llava_layout(tmp_path / "reference", **TINY)
    root = tmp_path / "llava"
    publish_while_generating(monkeypatch, reference, root)
    assert ensure_llava_layout(root, **TINY) == root
    assert tree_bytes(root) == tree_bytes(reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llava", "reference"]


def test_concurrent_writer_with_other_arguments_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = write_llava_layout(tmp_path / "reference", **{**TINY, "seed": 5})
    root = tmp_path / "llava"
    publish_while_generating(monkeypatch, reference, root)
    with pytest.raises(ValueError, match="seed"):
        ensure_llava_layout(root, **TINY)
    assert tree_bytes(root) == tree_bytes(reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llava", "reference"]


def test_crash_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(scene):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(synthetic_llava, "render_image", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ensure_llava_layout(tmp_path / "llava", **TINY)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"train_images": 0}, "train_images"),
        ({"image_size": 8}, "image_size"),
        ({"seed": -1}, "seed"),
        ({"val_images": 2.0}, "val_images"),
        ({"language_model": {"layers": 2}}, "language_model.layers"),
        ({"language_model": {"num_heads": 0}}, "language_model.num_heads"),
        ({"language_model": {"hidden_size": 30}}, "language_model.hidden_size"),
        ({"prompt_mix": {"textvqa": 0.8, "choice": 0.5}}, "prompt_mix"),
        ({"prompt_mix": {"ocr": 0.1}}, "prompt_mix"),
    ],
)
def test_invalid_arguments(tmp_path: Path, override: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        write_llava_layout(tmp_path / "x", **{**ARGS, **override})
    assert not (tmp_path / "x").exists()


def test_samples_parse_as_conversations(root: Path) -> None:
    for name in ("pretrain.json", "finetune.json", "finetune_val.json"):
        samples = load(root, name)
        assert len({s["id"] for s in samples}) == len(samples)
        for sample in samples:
            conversation = Conversation.from_llava(sample, name)
            if "image" in sample:
                assert (root / "images" / sample["image"]).is_file()
                assert conversation.turns[0].human.startswith(f"{IMAGE_PLACEHOLDER}\n")
                assert all(IMAGE_PLACEHOLDER not in t.human for t in conversation.turns[1:])
            else:
                assert all(IMAGE_PLACEHOLDER not in t.human for t in conversation.turns)
            assert all(len(t.assistant.split()) == 1 or name == "pretrain.json" for t in conversation.turns)
    finetune = load(root, "finetune.json")
    assert all(2 <= len(qa_pairs(s)) <= 3 for s in finetune if "image" in s)
    text_only = [s for s in finetune if "image" not in s]
    assert len(text_only) == 1 and all(question_type(q) == "fact" for q, _ in qa_pairs(text_only[0]))
    assert {question_type(q) for s in load(root, "finetune_val.json") for q, _ in qa_pairs(s)} <= set(
        QUESTION_TYPES
    )


def test_answers_match_the_scenes(root: Path) -> None:
    checked = Counter()
    for name, split in (("finetune.json", "train"), ("finetune_val.json", "val")):
        for sample in load(root, name):
            if "image" not in sample:
                continue
            index = int(sample["image"].split("_")[1].split(".")[0])
            for question, answer in qa_pairs(sample):
                check_answer(question, plain_answer(question, answer), split, index)
                checked[question_type(question)] += 1
    assert set(checked) == set(QUESTION_TYPES), checked
    # Captions name every shape once, left to right.
    for sample in load(root, "pretrain.json")[:4]:
        index = int(sample["id"].split("_")[1])
        facts = scene_facts(llava_scene(0, "train", index, 64))
        caption = qa_pairs(sample)[0][1]
        assert sorted(w for w in caption.split() if w in SHAPE_CLASSES) == sorted(facts.classes)


def test_textvqa(root: Path) -> None:
    document = load(root, "textvqa/TextVQA_val.json")
    assert document["dataset_name"] == "textvqa" and document["dataset_type"] == "val"
    data = document["data"]
    assert len(data) == 6 and [e["question_id"] for e in data] == list(range(6))
    val_answers = {s["image"]: dict(qa_pairs(s)) for s in load(root, "finetune_val.json")}
    for entry in data:
        assert (
            entry["image_file"] == f"{entry['image_id']}.png"
            and (root / "images" / entry["image_file"]).is_file()
        )
        assert len(entry["answers"]) == 10
        majority, count = Counter(entry["answers"]).most_common(1)[0]
        assert count >= 6
        index = int(entry["image_id"].split("_")[1])
        check_answer(entry["question"], majority, "val", index)
        assert set(entry["ocr_tokens"]) == set(scene_facts(llava_scene(0, "val", index, 64)).classes)
        assert entry["image_file"] in val_answers


def test_mmbench(root: Path) -> None:
    with (root / "mmbench" / "mmbench_dev.tsv").open() as stream:
        assert stream.readline().rstrip("\n").split("\t") == list(MMBENCH_COLUMNS)
    rows = mmbench_rows(root)
    assert len(rows) == 6
    for row in rows:
        options = [row[c] for c in "ABCD"]
        filled = [o for o in options if o]
        assert 2 <= len(filled) <= 4 and options[: len(filled)] == filled  # empty cells only at the end
        assert row["answer"] in "ABCD"[: len(filled)]
        assert row["split"] == "dev" and row["category"] in {"counting", "colour", "position", "presence"}
        image_bytes = base64.b64decode(row["image"])
        index = int(row["index"])
        assert image_bytes == (root / "images" / f"val_{index:05d}.png").read_bytes()
        with Image.open(io.BytesIO(image_bytes)) as image:
            assert image.size == (64, 64)
        check_answer(row["question"], row[row["answer"]], "val", index)


def test_tokenizer_and_model(root: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = root / "language_model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.pad_token is None
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert load(root, MANIFEST_NAME)["vocab_size"] == len(tokenizer)
    for text in set(all_texts(root)):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids) == normalise(text)
    vocabulary = tokenizer.get_vocab()
    prompt_words = [*tokenizer_words(" ".join([*EVAL_PROMPTS, HINT, "a b c d , '"])), "reference", "ocr"]
    assert {"reference", "ocr", "token", "option", "'", "s", "a", "b", "c", "d"} <= set(prompt_words)
    assert all(word in vocabulary for word in prompt_words), [w for w in prompt_words if w not in vocabulary]
    sentence = "two shapes : a red circle and a blue star ."
    assert tokenizer.decode(tokenizer(sentence, add_special_tokens=False).input_ids) == sentence
    with_bos = tokenizer(sentence).input_ids  # add_special_tokens=True: bos first, like Llama
    assert with_bos[0] == 1 and with_bos[1:] == tokenizer(sentence, add_special_tokens=False).input_ids
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        logits = model(torch.tensor([with_bos])).logits
    assert logits.shape == (1, len(with_bos), len(tokenizer))
    assert model.config.tie_word_embeddings is False and model.config.pad_token_id is None


def test_tiny_language_model_is_deterministic(tmp_path: Path) -> None:
    texts = ["b a", "c ?"]
    state = torch.random.get_rng_state()
    first = write_tiny_language_model(tmp_path / "one", texts, **SMALL_LM)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    second = write_tiny_language_model(tmp_path / "two", list(reversed(texts)), **SMALL_LM)
    third = write_tiny_language_model(tmp_path / "three", texts, **SMALL_LM, seed=1)
    assert tree_bytes(first) == tree_bytes(second)
    assert (first / "model.safetensors").read_bytes() != (third / "model.safetensors").read_bytes()


def test_question_type() -> None:
    assert question_type("<image>\nhow many shapes are there ?") == "count"
    assert question_type("Is there a star ?") == "presence"
    assert question_type("what colour is the ring ?") == "colour"
    assert question_type("where is the ring ?") == "position"
    assert question_type("which shape is the largest ?") == "largest"
    assert question_type("how many sides does a hexagon have ?") == "fact"
    assert question_type("what is this ?") == "other"
    # The benchmark prompt forms of finetune.json, decorations stripped.
    textvqa = textvqa_prompt("where is the ring ?", ["ring", "star"], use_ocr=True)
    assert question_type(f"{IMAGE_PLACEHOLDER}\n{textvqa}") == "position"
    assert question_type(textvqa_prompt("is there a star ?", None, use_ocr=False)) == "presence"
    choice = Round(0, 1, "what colour is the star ?", {"A": "red", "B": "blue", "C": "green"}, "A")
    assert question_type(mmbench_prompt(choice, HINT)) == "colour"
    assert question_type(f"{IMAGE_PLACEHOLDER}\n{mmbench_prompt(choice, None)}") == "colour"
    assert split_prompt(f"{IMAGE_PLACEHOLDER}\n{mmbench_prompt(choice, HINT)}") == (
        "what colour is the star ?",
        {"A": "red", "B": "blue", "C": "green"},
    )
    assert split_prompt(textvqa) == ("where is the ring ?", {})


def test_majority_baseline_matches_a_hand_count(root: Path) -> None:
    train: dict[str, Counter] = {}
    for sample in load(root, "finetune.json"):
        if "image" in sample:
            for question, answer in qa_pairs(sample):
                # Multiple-choice letters count as the option they pick, never as letters.
                train.setdefault(question_type(question), Counter())[plain_answer(question, answer)] += 1
    hits: dict[str, list[bool]] = {}
    for sample in load(root, "finetune_val.json"):
        ((question, answer),) = qa_pairs(sample)
        kind = question_type(question)
        top = max(train[kind].values()) if kind in train else 0
        guess = min(a for a, n in train[kind].items() if n == top) if kind in train else None
        hits.setdefault(kind, []).append(guess == answer)
    baseline = majority_baseline(root)
    for kind, h in hits.items():
        assert baseline[kind] == pytest.approx(sum(h) / len(h))
    assert baseline["overall"] == pytest.approx(
        sum(sum(h) for h in hits.values()) / sum(map(len, hits.values()))
    )
    assert all(0.0 <= v <= 1.0 for v in baseline.values())
    assert load(root, MANIFEST_NAME)["majority_baselines"] == baseline
