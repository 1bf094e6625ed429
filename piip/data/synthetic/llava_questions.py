"""The questions of the LLaVA layout, in every prompt form it writes, and how to read them back.

Every question is answerable from the pixels (`llava_scenes.SceneFacts`) and uses one fixed wording per
type (`QUESTION_TYPES`), with words and punctuation separated by spaces; answers are single words:

- count    "how many shapes are there ?"      -> "1" .. "4"
- presence "is there a star ?"                -> "yes" / "no" (present and absent classes equally often)
- colour   "what colour is the circle ?"      -> a palette name; only for a class present exactly once
- position "where is the star ?"              -> left / right / top / bottom / centre from the centre of
                                                 its visible box; only for a class present once and a
                                                 centre clearly in one region (`llava_scenes`)
- largest  "which shape is the largest ?"     -> the class with the largest visible area; only when it
                                                 clearly beats every shape of another class

Like LLaVA-1.5's instruction mix, `finetune_turns` asks some image questions in the TextVQA prompt of the
evaluation (`metrics.vqa.textvqa_prompt`: question, "Reference OCR token: ..." half the time, the
short-answer instruction) and some as multiple choice (`metrics.mmbench.mmbench_prompt`: optional hint, the
options an MMBench row of that type would have, rotated at random, the letter instruction; answered with
the letter), so the tiny model has seen both prompt forms before it is evaluated on the held-out val files,
which keep their plain / benchmark forms (`textvqa_entry`, `mmbench_row`). Types without an MMBench form
(largest) stay plain. `split_prompt` recovers the plain question and the options, `question_type` its type.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from piip.data.llava.conversation import ASSISTANT, HUMAN, IMAGE_PLACEHOLDER
from piip.data.synthetic.llava_scenes import PALETTE, SceneFacts, llava_rng
from piip.data.synthetic.scene import SHAPE_CLASSES, SPLITS
from piip.evaluation.mmbench import (
    MMBENCH_INSTRUCTION,
    OPTION_LETTERS,
    MMBenchQuestion,
    circular_rounds,
    mmbench_prompt,
)
from piip.evaluation.textvqa import textvqa_prompt

__all__ = [
    "QUESTION_TYPES",
    "TEXT_TYPE",
    "caption",
    "conversation_sample",
    "eligible_questions",
    "fact_pairs",
    "finetune_turns",
    "make_question",
    "mmbench_row",
    "question_type",
    "split_prompt",
    "textvqa_entry",
    "vocabulary_extras",
]

QUESTION_TYPES: tuple[str, ...] = ("count", "presence", "colour", "position", "largest")
TEXT_TYPE = "fact"  # question type of the text-only samples (shape facts, no image)
_TEXT_SPLIT = len(SPLITS)  # "split" key of the text-only samples' Generators
_USE_OCR_SHARE = 0.5  # TextVQA-style turns that list the OCR tokens
_HINT_SHARE = 0.5  # multiple-choice turns (and MMBench rows) with the hint line
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_MMBENCH_HINT = "The image shows coloured shapes on a background."
# Shape facts for the text-only samples (question, answer).
_FACTS: tuple[tuple[str, str], ...] = (
    ("how many sides does a triangle have ?", "3"),
    ("how many sides does a square have ?", "4"),
    ("how many sides does a diamond have ?", "4"),
    ("how many sides does a hexagon have ?", "6"),
    ("how many points does a star have ?", "5"),
    ("how many arms does a cross have ?", "4"),
    ("is a circle round ?", "yes"),
    ("is a ring round ?", "yes"),
    ("is a square round ?", "no"),
    ("is a triangle round ?", "no"),
    ("does a ring have a hole ?", "yes"),
    ("does a circle have a hole ?", "no"),
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(facts: SceneFacts) -> str:
    """e.g. "two shapes : a red circle and a blue star ." (shapes from left to right)."""
    phrases = [
        f"{_article(facts.colours[i])} {facts.colours[i]} {facts.classes[i]}" for i in facts.left_to_right()
    ]
    listed = phrases[0] if len(phrases) == 1 else " , ".join(phrases[:-1]) + " and " + phrases[-1]
    noun = "shape" if facts.count == 1 else "shapes"
    return f"{_NUMBERS[facts.count]} {noun} : {listed} ."


def eligible_questions(facts: SceneFacts) -> dict[str, list[str]]:
    """Question type -> the shape classes it may ask about ([""] where it names none); absent if none."""
    once = facts.once()
    eligible: dict[str, list[str]] = {"count": [""], "presence": list(SHAPE_CLASSES)}
    if once:
        eligible["colour"] = once
    placed = [c for c in once if facts.positions[facts.classes.index(c)] is not None]
    if placed:
        eligible["position"] = placed
    if facts.largest() is not None:
        eligible["largest"] = [""]
    return eligible


def make_question(kind: str, facts: SceneFacts, rng: np.random.Generator) -> tuple[str, str]:
    """One (question, answer) of type `kind` about the scene; `rng` picks the shape asked about."""
    eligible = eligible_questions(facts)[kind]
    if kind == "count":
        return "how many shapes are there ?", str(facts.count)
    if kind == "presence":
        present = sorted(set(facts.classes), key=SHAPE_CLASSES.index)
        answer = "yes" if rng.random() < 0.5 else "no"
        pool = present if answer == "yes" else [c for c in SHAPE_CLASSES if c not in present]
        name = pool[int(rng.integers(len(pool)))]
        return f"is there {_article(name)} {name} ?", answer
    if kind == "largest":
        return "which shape is the largest ?", str(facts.largest())
    name = eligible[int(rng.integers(len(eligible)))]
    instance = facts.classes.index(name)
    if kind == "colour":
        return f"what colour is the {name} ?", facts.colours[instance]
    if kind == "position":
        return f"where is the {name} ?", str(facts.positions[instance])
    raise ValueError(f"unknown question type {kind!r}")


_PREFIXES: tuple[tuple[str, str], ...] = (
    ("how many shapes", "count"),
    ("is there", "presence"),
    ("what colour is the", "colour"),
    ("where is the", "position"),
    ("which shape is the largest", "largest"),
    ("how many sides", TEXT_TYPE),
    ("how many points", TEXT_TYPE),
    ("how many arms", TEXT_TYPE),
    ("is a ", TEXT_TYPE),
    ("does a ", TEXT_TYPE),
)


# The lines the benchmark prompts add around a question, taken from the evaluation's own prompt builders.
_TEXTVQA_INSTRUCTION = textvqa_prompt("", None, use_ocr=False).strip()
_OCR_PREFIX = textvqa_prompt("", ["@"], use_ocr=True).split("\n")[1].split("@")[0].strip()
_DECORATIONS = frozenset({_TEXTVQA_INSTRUCTION, MMBENCH_INSTRUCTION, _MMBENCH_HINT})
_OPTION_LINE = re.compile(rf"([{''.join(OPTION_LETTERS)}])\. (.*)")


def split_prompt(text: str) -> tuple[str, dict[str, str]]:
    """The plain question of a human turn written here and its lettered options ({} unless it is multiple
    choice): the image placeholder, the MMBench hint, option lines and instruction (`mmbench_prompt`), and
    the TextVQA OCR line and instruction (`textvqa_prompt`) removed."""
    lines, options = [], {}
    for line in text.replace(IMAGE_PLACEHOLDER, "\n").split("\n"):
        line = line.strip()
        option = _OPTION_LINE.fullmatch(line)
        if option:
            options[option[1]] = option[2]
        elif line and line not in _DECORATIONS and not line.startswith(_OCR_PREFIX):
            lines.append(line)
    return " ".join(lines), options


def question_type(question: str) -> str:
    """The type (`QUESTION_TYPES`, or "fact" for the text-only shape facts) of a question written here, in
    any of its prompt forms (`split_prompt`; case ignored); "other" for anything else."""
    text = " ".join(split_prompt(question)[0].lower().split())
    for prefix, kind in _PREFIXES:
        if text.startswith(prefix):
            return kind
    return "other"


def conversation_sample(
    sample_id: str, image: str | None, pairs: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    """A LLaVA sample of (question, answer) turns; `<image>\\n` opens the first turn of an image sample."""
    messages = []
    for turn, (question, answer) in enumerate(pairs):
        value = f"{IMAGE_PLACEHOLDER}\n{question}" if image is not None and turn == 0 else question
        messages += [{"from": HUMAN, "value": value}, {"from": ASSISTANT, "value": answer}]
    sample: dict[str, Any] = {"id": sample_id}
    if image is not None:
        sample["image"] = image
    sample["conversations"] = messages
    return sample


def _ocr_tokens(facts: SceneFacts) -> list[str]:
    """The scenes contain no text: their "OCR tokens" are the names of the shapes shown, left to right."""
    return list(dict.fromkeys(facts.classes[i] for i in facts.left_to_right()))


def _choice_options(kind: str, answer: str, rng: np.random.Generator) -> list[str]:
    """The options of a multiple-choice question (MMBench rows and finetune turns), `answer` among them:
    presence has 2 ("yes", "no"), colour 3 and count and position 4; counts ascending, colours and
    positions in random order."""
    if kind == "presence":
        return ["yes", "no"]
    if kind == "count":
        others = [str(n) for n in range(1, 7) if str(n) != answer]
        return sorted([answer, *rng.choice(others, 3, replace=False).tolist()], key=int)
    if kind not in ("colour", "position"):
        raise ValueError(f"question type {kind!r} has no multiple-choice form")
    pool = [p for p in (PALETTE if kind == "colour" else _POSITIONS) if p != answer]
    options = [answer, *rng.choice(pool, 2 if kind == "colour" else 3, replace=False).tolist()]
    return [options[int(i)] for i in rng.permutation(len(options))]


def _formatted(
    kind: str, question: str, answer: str, facts: SceneFacts, rng: np.random.Generator, mix: dict[str, float]
) -> tuple[str, str, str]:
    """(form, prompt, answer) of one finetune turn: "textvqa" (`mix["textvqa"]`; `textvqa_prompt`, OCR
    tokens listed half the time), "choice" (`mix["choice"]`, types with an MMBench form only; the MMBench
    options rotated by a random shift, the hint half the time, `mmbench_prompt`, answered with the upper-case
    letter) or "plain" (the question as is)."""
    draw = rng.random()
    if draw < mix["textvqa"]:
        use_ocr = bool(rng.random() < _USE_OCR_SHARE)
        return "textvqa", textvqa_prompt(question, _ocr_tokens(facts), use_ocr), answer
    if draw < mix["textvqa"] + mix["choice"] and kind in _CHOICE_TYPES:
        options = _choice_options(kind, answer, rng)
        letters = OPTION_LETTERS[: len(options)]
        row = MMBenchQuestion(
            0, question, None, dict(zip(letters, options, strict=True)), letters[options.index(answer)],
            kind, kind, "train", "",
        )  # fmt: skip
        shown = circular_rounds(row)[int(rng.integers(len(options)))]  # a random one of its rotations
        hint = _MMBENCH_HINT if rng.random() < _HINT_SHARE else None
        return "choice", mmbench_prompt(shown, hint), shown.answer
    return "plain", question, answer


def finetune_turns(
    facts: SceneFacts, rng: np.random.Generator, format_rng: np.random.Generator, mix: dict[str, float]
) -> list[tuple[str, str, str]]:
    """(form, prompt, answer) of 2-3 questions of different types (random order) about one train scene:
    `rng` draws the questions, `format_rng` their prompt forms (`_formatted`)."""
    kinds = [k for k in QUESTION_TYPES if k in eligible_questions(facts)]
    chosen = rng.permutation(len(kinds))[: min(int(rng.integers(2, 4)), len(kinds))]
    turns = []
    for i in chosen:
        kind = kinds[int(i)]
        turns.append(_formatted(kind, *make_question(kind, facts, rng), facts, format_rng, mix))
    return turns


def fact_pairs(seed: int, index: int) -> list[tuple[str, str]]:
    """The 1-2 (question, answer) shape facts of text-only sample `index`."""
    rng = llava_rng(seed, _TEXT_SPLIT, index, "finetune")
    chosen = rng.permutation(len(_FACTS))[: int(rng.integers(1, 3))]
    return [_FACTS[int(i)] for i in chosen]


# --------------------------------------------------------------------------------- TextVQA and MMBench


def _answer_variants(kind: str, answer: str, facts: SceneFacts) -> list[str]:
    """How other annotators might phrase `answer` (TextVQA's ten answers disagree in wording)."""
    if kind == "count":
        return [_NUMBERS[int(answer)], f"{answer} shape" if answer == "1" else f"{answer} shapes"]
    if kind == "presence":
        return ["yes there is", "yeah"] if answer == "yes" else ["no there is not", "nope"]
    if kind == "colour":
        shades = {"white": ["off white", "light grey"], "black": ["dark grey", "very dark"]}
        return [*shades.get(answer, [f"dark {answer}", f"light {answer}"]), f"{answer} colour"]
    if kind == "position":
        centre = ["center", "middle", "in the middle"]
        return centre if answer == "centre" else [f"on the {answer}", f"{answer} side"]
    colour = facts.colours[facts.classes.index(answer)]
    return [f"the {answer}", f"{colour} {answer}", f"big {answer}"]


def textvqa_entry(question_id: int, index: int, facts: SceneFacts, rng: np.random.Generator) -> dict:
    """One question on val image `index` with ten annotator answers: 6-10 exact, the rest variants (so the
    majority answer is always the true one)."""
    kinds = [k for k in QUESTION_TYPES if k in eligible_questions(facts)]
    kind = kinds[int(rng.integers(len(kinds)))]
    question, answer = make_question(kind, facts, rng)
    exact = int(rng.integers(6, 11))
    variants = _answer_variants(kind, answer, facts)
    answers = [answer] * exact + [variants[int(rng.integers(len(variants)))] for _ in range(10 - exact)]
    order = rng.permutation(10)
    stem = f"val_{index:05d}"
    return {
        "question_id": question_id,
        "image_id": stem,
        "image_file": f"{stem}.png",
        "question": question,
        "answers": [answers[int(i)] for i in order],
        "ocr_tokens": _ocr_tokens(facts),
    }


_MMBENCH_CATEGORIES: dict[str, tuple[str, str]] = {
    # category -> (question type, l2-category)
    "counting": ("count", "fine-grained perception (cross-instance)"),
    "colour": ("colour", "fine-grained perception (instance-level)"),
    "position": ("position", "fine-grained perception (instance-level)"),
    "presence": ("presence", "coarse perception"),
}
_POSITIONS = ("left", "right", "top", "bottom", "centre")
_CHOICE_TYPES = frozenset(kind for kind, _ in _MMBENCH_CATEGORIES.values())


def mmbench_row(index: int, facts: SceneFacts, png: bytes, rng: np.random.Generator) -> dict[str, Any]:
    """One multiple-choice row: presence has 2 options, colour 3, counting and position 4."""
    categories = [c for c, (kind, _) in _MMBENCH_CATEGORIES.items() if kind in eligible_questions(facts)]
    category = categories[int(rng.integers(len(categories)))]
    kind, l2_category = _MMBENCH_CATEGORIES[category]
    question, answer = make_question(kind, facts, rng)
    options = _choice_options(kind, answer, rng)
    letters = OPTION_LETTERS
    row: dict[str, Any] = {
        "index": index,
        "question": question,
        "hint": _MMBENCH_HINT if rng.random() < _HINT_SHARE else "",
    }
    row.update({letter: options[i] if i < len(options) else "" for i, letter in enumerate(letters)})
    row.update(
        {
            "answer": letters[options.index(answer)],
            "category": category,
            "l2-category": l2_category,
            "split": "dev",
            "image": base64.b64encode(png).decode("ascii"),
        }
    )
    return row


def vocabulary_extras() -> list[str]:
    """Every answer word and shape fact, so the vocabulary does not depend on which ones a small set drew."""
    words = [*PALETTE, *SHAPE_CLASSES, *_POSITIONS, *_NUMBERS, *map(str, range(10)), "yes", "no", "an"]
    return [" ".join(words), *(" ".join(fact) for fact in _FACTS)]
