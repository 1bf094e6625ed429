"""The synthetic LLaVA layout's fine-tuning mix of prompt forms: plain questions, TextVQA prompts and
MMBench-style multiple choice, each answered from the scene and tokenised by the tiny language model."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from piip.data.llava.conversation import IMAGE_PLACEHOLDER, Conversation
from piip.data.synthetic import llava as synthetic_llava
from piip.data.synthetic.language_model import normalise
from piip.data.synthetic.llava import ensure_llava_layout, majority_baseline, write_llava_layout
from piip.data.synthetic.llava_questions import QUESTION_TYPES, question_type, split_prompt
from piip.data.synthetic.llava_scenes import llava_scene, scene_facts
from piip.data.synthetic.publish import MANIFEST_NAME
from piip.evaluation.mmbench import MMBENCH_INSTRUCTION, OPTION_LETTERS, Round, mmbench_prompt
from piip.evaluation.textvqa import textvqa_prompt
from tests.synthetic_llava_helpers import (
    HINT,
    MIXED,
    MMBENCH_SUFFIX,
    TEXTVQA_SUFFIX,
    TINY,
    all_texts,
    check_answer,
    load,
    mmbench_rows,
    plain_answer,
    qa_pairs,
)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llava_layout(tmp_path_factory.mktemp("llava") / "mixed", **MIXED)


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
