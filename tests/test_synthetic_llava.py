"""LLaVA layout from the synthetic shapes (piip.data.synthetic.llava) and its tiny language model."""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from piip.data.llava.conversation import IMAGE_PLACEHOLDER, Conversation, template_texts
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
from piip.data.synthetic.llava_scenes import PALETTE, llava_scene, scene_facts
from piip.data.synthetic.publish import MANIFEST_NAME
from piip.data.synthetic.render import render_image, render_instance_masks
from piip.data.synthetic.scene import SHAPE_CLASSES
from piip.evaluation.mmbench import MMBENCH_INSTRUCTION, OPTION_LETTERS, Round, mmbench_prompt
from piip.evaluation.textvqa import textvqa_prompt

ARGS = {"train_images": 12, "val_images": 6, "image_size": 64, "seed": 0}
SMALL_LM = {"hidden_size": 32, "intermediate_size": 64, "num_heads": 2}
TINY = {**ARGS, "train_images": 2, "val_images": 1, "language_model": SMALL_LM}
MIXED = {**ARGS, "train_images": 40, "val_images": 4, "language_model": SMALL_LM}
TEXTVQA_SUFFIX = "\nAnswer the question using a single word or phrase."
MMBENCH_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
HINT = "The image shows coloured shapes on a background."


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llava_layout(tmp_path_factory.mktemp("llava") / "llava", **ARGS)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llava_layout(tmp_path_factory.mktemp("llava") / "mixed", **MIXED)


def load(root: Path, name: str):
    return json.loads((root / name).read_text())


def mmbench_rows(root: Path) -> list[dict[str, str]]:
    with (root / "mmbench" / "mmbench_dev.tsv").open(newline="") as stream:
        return list(csv.DictReader(stream, delimiter="\t"))


def qa_pairs(sample: dict) -> list[tuple[str, str]]:
    messages = sample["conversations"]
    return [(h["value"], a["value"]) for h, a in zip(messages[::2], messages[1::2], strict=True)]


def all_texts(root: Path) -> list[str]:
    texts = []
    for name in ("pretrain.json", "finetune.json", "finetune_val.json"):
        texts += [m["value"] for sample in load(root, name) for m in sample["conversations"]]
    for entry in load(root, "textvqa/TextVQA_val.json")["data"]:
        texts += [entry["question"], *entry["answers"], *entry["ocr_tokens"]]
    for row in mmbench_rows(root):
        texts += [row[c] for c in ("question", "hint", "A", "B", "C", "D")]
    return texts + [*template_texts(), *EVAL_PROMPTS]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


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


def options_of(prompt: str) -> dict[str, str]:
    """The "X. text" option lines of a multiple-choice prompt (parsed here, independently of the module)."""
    return {line[0]: line[3:] for line in prompt.split("\n") if line[:1] in "ABCD" and line[1:3] == ". "}


def plain_answer(prompt: str, answer: str) -> str:
    """The answer as text: a multiple-choice letter replaced by its option."""
    return options_of(prompt)[answer] if prompt.endswith(MMBENCH_SUFFIX) else answer


def check_answer(question: str, answer: str, split: str, index: int) -> None:
    """Recompute the answer from the scene's instances and visible masks (`question` in any prompt form,
    `answer` as text)."""
    scene = llava_scene(0, split, index, 64)
    masks = render_instance_masks(scene)
    classes = [i.class_name for i in scene.instances]
    question = split_prompt(question)[0]
    words = question.split()
    kind = question_type(question)
    if kind == "count":
        assert answer == str(sum(1 for m in masks if m.any()))
    elif kind == "presence":
        assert answer == ("yes" if words[-2] in classes else "no")
    elif kind == "colour":
        assert classes.count(words[-2]) == 1
        assert PALETTE[answer] == scene.instances[classes.index(words[-2])].colour
    elif kind == "position":
        mask = masks[classes.index(words[-2])]
        ys, xs = np.nonzero(mask)
        x, y = (xs.min() + xs.max() + 1) / 2 / 64 - 0.5, (ys.min() + ys.max() + 1) / 2 / 64 - 0.5
        expected = {"left": x < -0.2, "right": x > 0.2, "top": y < -0.2, "bottom": y > 0.2}
        assert expected.get(answer, max(abs(x), abs(y)) <= 0.12), (answer, x, y)
    elif kind == "largest":
        areas = [int(m.sum()) for m in masks]
        assert answer == classes[int(np.argmax(areas))]
    else:
        raise AssertionError(f"unexpected question {question!r}")


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


def turn_form(human: str) -> str:
    if human.endswith(TEXTVQA_SUFFIX):
        return "textvqa"
    return "choice" if human.endswith(MMBENCH_SUFFIX) else "plain"


def test_finetune_mixes_benchmark_prompt_forms(mixed: Path) -> None:
    forms: Counter = Counter()
    variants: Counter = Counter()
    for sample in load(mixed, "finetune.json"):
        if "image" not in sample:
            assert all(turn_form(q) == "plain" for q, _ in qa_pairs(sample))  # text-only facts stay plain
            continue
        assert sample["image"].startswith("train_")
        index = int(sample["image"].split("_")[1].split(".")[0])
        facts = scene_facts(llava_scene(0, "train", index, 64))
        for turn, (human, answer) in enumerate(qa_pairs(sample)):
            assert human.startswith(f"{IMAGE_PLACEHOLDER}\n") == (turn == 0)
            prompt = human.removeprefix(f"{IMAGE_PLACEHOLDER}\n")
            question, options = split_prompt(human)
            form = turn_form(human)
            forms[form] += 1
            if form == "textvqa":
                tokens = list(dict.fromkeys(facts.classes[i] for i in facts.left_to_right()))
                use_ocr = "\nReference OCR token: " in prompt
                assert prompt == textvqa_prompt(question, tokens, use_ocr)  # exact evaluation wording
                assert prompt.endswith(TEXTVQA_SUFFIX) and not options
                variants[f"ocr={use_ocr}"] += 1
                check_answer(question, answer, "train", index)
            elif form == "choice":
                kind = question_type(question)
                assert kind in {"count", "presence", "colour", "position"}
                assert len(options) == {"presence": 2, "colour": 3}.get(kind, 4)
                assert list(options) == list(OPTION_LETTERS[: len(options)])
                assert answer in options and answer.isupper()  # the letter, upper case
                check_answer(question, options[answer], "train", index)  # it picks the true answer
                assert list(options.values()).count(options[answer]) == 1
                hint = HINT if prompt.startswith(f"{HINT}\n") else None
                assert prompt == mmbench_prompt(Round(0, 0, question, options, answer), hint)
                assert prompt.endswith(MMBENCH_INSTRUCTION)
                variants[f"hint={hint is not None}"] += 1
                variants[f"letter={answer}"] += 1
            else:
                assert prompt == question and not options and question_type(question) in QUESTION_TYPES
                check_answer(question, answer, "train", index)
    total = sum(forms.values())
    fractions = {form: n / total for form, n in forms.items()}
    assert total > 80 and forms == load(mixed, MANIFEST_NAME)["finetune_turn_forms"]
    # 0.25 TextVQA, 0.25 multiple choice ("largest" stays plain: a bit less), the rest plain.
    assert 0.15 <= fractions["textvqa"] <= 0.35, fractions
    assert 0.12 <= fractions["choice"] <= 0.33, fractions
    assert 0.4 <= fractions["plain"] <= 0.65, fractions
    for variant in ("ocr=True", "ocr=False", "hint=True", "hint=False", "letter=A", "letter=B", "letter=C"):
        assert variants[variant] > 0, variants


def test_mixed_layout_parses_and_tokenises(mixed: Path) -> None:
    for name in ("pretrain.json", "finetune.json", "finetune_val.json"):
        for sample in load(mixed, name):
            conversation = Conversation.from_llava(sample, name)
            if name == "finetune_val.json":
                assert sample["image"].startswith("val_")  # held out: disjoint from the train images
                assert all(turn_form(t.human) == "plain" for t in conversation.turns)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(mixed / "language_model")
    for text in set(all_texts(mixed)):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids, text
        assert tokenizer.decode(ids) == normalise(text)
    # Evaluation prompts of the held-out files tokenise too.
    for entry in load(mixed, "textvqa/TextVQA_val.json")["data"]:
        for use_ocr in (True, False):
            prompt = textvqa_prompt(entry["question"], entry["ocr_tokens"], use_ocr)
            assert tokenizer.unk_token_id not in tokenizer(prompt).input_ids
    for row in mmbench_rows(mixed):
        options = {letter: row[letter] for letter in "ABCD" if row[letter]}
        prompt = mmbench_prompt(Round(0, 0, row["question"], options, row["answer"]), row["hint"] or None)
        assert tokenizer.unk_token_id not in tokenizer(prompt).input_ids


def test_majority_baseline_maps_letters_back(mixed: Path) -> None:
    baseline = majority_baseline(mixed)
    assert load(mixed, MANIFEST_NAME)["majority_baselines"] == baseline
    assert set(baseline) <= {*QUESTION_TYPES, "overall"}  # no "other": every val question is classified
    plain = load(mixed, "finetune.json")
    for sample in plain:  # the same data with every turn rewritten in its plain form
        messages = sample["conversations"]
        for human, reply in zip(messages[::2], messages[1::2], strict=True):
            reply["value"] = plain_answer(human["value"], reply["value"])
            human["value"] = split_prompt(human["value"])[0]
    held_out = load(mixed, "finetune_val.json")
    assert synthetic_llava._baseline(plain, held_out) == baseline
    # Hand-made: two multiple-choice turns pick "3" (as B, then A), one plain turn says "2".
    count = "how many shapes are there ?"

    def choice(options: dict[str, str], letter: str) -> tuple[str, str]:
        return mmbench_prompt(Round(0, 0, count, options, letter), HINT), letter

    turns = [(count, "2"), choice({"A": "1", "B": "3"}, "B"), choice({"A": "3", "B": "4"}, "A")]
    train = [
        {
            "id": str(i),
            "image": "x.png",
            "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
        }
        for i, (q, a) in enumerate(turns)
    ]
    val = [
        {
            "id": "v",
            "image": "y.png",
            "conversations": [{"from": "human", "value": count}, {"from": "gpt", "value": "3"}],
        }
    ]
    assert synthetic_llava._baseline(train, val) == {"count": 1.0, "overall": 1.0}


def test_old_format_revision_is_refused(tmp_path: Path) -> None:
    root = ensure_llava_layout(tmp_path / "llava", **TINY)
    manifest = load(root, MANIFEST_NAME)
    assert manifest["version"][1] >= 2
    manifest["version"] = [manifest["version"][0], 1]  # a folder written before the prompt-form mix
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="version"):
        ensure_llava_layout(root, **TINY)


def test_prompt_mix_sets_the_shares_of_benchmark_prompts(tmp_path: Path) -> None:
    root = write_llava_layout(tmp_path / "mix", **{**MIXED, "prompt_mix": {"textvqa": 0.5, "choice": 0.0}})
    forms = load(root, MANIFEST_NAME)["finetune_turn_forms"]
    assert forms["choice"] == 0 and 0.35 < forms["textvqa"] / sum(forms.values()) < 0.65
    assert load(root, MANIFEST_NAME)["args"]["prompt_mix"] == {"textvqa": 0.5, "choice": 0.0}
