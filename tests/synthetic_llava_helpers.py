"""Constants and readers shared by the tests of the synthetic LLaVA layout."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from piip.data.llava.conversation import template_texts
from piip.data.synthetic.llava import EVAL_PROMPTS
from piip.data.synthetic.llava_questions import question_type, split_prompt
from piip.data.synthetic.llava_scenes import PALETTE, llava_scene
from piip.data.synthetic.render import render_instance_masks

ARGS = {"train_images": 12, "val_images": 6, "image_size": 64, "seed": 0}
SMALL_LM = {"hidden_size": 32, "intermediate_size": 64, "num_heads": 2}
TINY = {**ARGS, "train_images": 2, "val_images": 1, "language_model": SMALL_LM}
MIXED = {**ARGS, "train_images": 40, "val_images": 4, "language_model": SMALL_LM}
TEXTVQA_SUFFIX = "\nAnswer the question using a single word or phrase."
MMBENCH_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
HINT = "The image shows coloured shapes on a background."


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
