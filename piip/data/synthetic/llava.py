"""Deterministic LLaVA-style data from the "shapes" scenes: captions, visual Q/A, TextVQA and MMBench files,
and the tiny language model (tokenizer + random Llama) whose vocabulary covers every text written.

Scenes are the multi-object scenes of `piip.data.synthetic` (1-4 shapes, `sample_scene(dominant=False)`)
with every shape recoloured from the named `PALETTE`, so "what colour" has a one-word answer. Every
question is answerable from the pixels and uses one fixed wording per type (`QUESTION_TYPES`), with words
and punctuation separated by spaces; answers are single words:

- count    "how many shapes are there ?"      -> "1" .. "4"
- presence "is there a star ?"                -> "yes" / "no" (present and absent classes equally often)
- colour   "what colour is the circle ?"      -> a palette name; only for a class present exactly once
- position "where is the star ?"              -> left / right / top / bottom / centre from the centre of
                                                 its visible box; only for a class present once and a
                                                 centre clearly in one region (`_position`)
- largest  "which shape is the largest ?"     -> the class with the largest visible area; only when it
                                                 clearly beats every shape of another class

Like LLaVA-1.5's instruction mix, `finetune.json` asks about a quarter of its image questions in the
TextVQA prompt of the evaluation (`metrics.vqa.textvqa_prompt`: question, "Reference OCR token: ..." half
the time, the short-answer instruction) and a quarter as multiple choice (`metrics.mmbench.mmbench_prompt`:
optional hint, the options an MMBench row of that type would have, rotated at random, the letter
instruction; answered with the letter), so the tiny model has seen both prompt forms before it is
evaluated on the held-out val files, which keep their plain / benchmark forms. Types without an MMBench
form (largest) stay plain in that quarter. `split_prompt` recovers the plain question and the options.

Layout under `root` (see `write_llava_layout`): `images/{train,val}_<index:05d>.png`, `pretrain.json`,
`finetune.json`, `finetune_val.json`, `textvqa/TextVQA_val.json`, `mmbench/mmbench_dev.tsv`,
`language_model/` and the manifest `piip_synthetic.json`.

Determinism: each image draws its scene, its questions and (train) their prompt forms from Generators
seeded with `SeedSequence([seed, stream, split, index, purpose])`, so files are byte-identical for the same
arguments; the forms have their own purpose, so the questions asked do not depend on them.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from piip.data.llava.conversation import ASSISTANT, HUMAN, IMAGE_PLACEHOLDER
from piip.data.synthetic.language_model import write_tiny_language_model
from piip.data.synthetic.shapes import (
    EXTRA_LISTINGS,
    GENERATOR_VERSION,
    SHAPE_CLASSES,
    SPLITS,
    Scene,
    ShapeInstance,
    _contrast,
    _ensure,
    _validate_dense_args,
    _write_atomically,
    instance_boxes,
    render_image,
    render_instance_masks,
    sample_scene,
)
from piip.evaluation.mmbench import (
    MMBENCH_INSTRUCTION,
    OPTION_LETTERS,
    TSV_COLUMNS,
    MMBenchQuestion,
    circular_rounds,
    mmbench_prompt,
)
from piip.evaluation.textvqa import textvqa_prompt

__all__ = [
    "EVAL_PROMPTS",
    "FILES",
    "MMBENCH_COLUMNS",
    "PALETTE",
    "QUESTION_TYPES",
    "TEXT_TYPE",
    "SceneFacts",
    "caption",
    "ensure_llava_layout",
    "llava_scene",
    "majority_baseline",
    "question_type",
    "scene_facts",
    "split_prompt",
    "write_llava_layout",
]

log = logging.getLogger(__name__)

# Named shape colours, pairwise at least `_MIN_SHAPE_CONTRAST` (70) apart in RGB.
PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (25, 25, 25),
    "blue": (45, 85, 215),
    "green": (50, 170, 70),
    "orange": (245, 145, 30),
    "purple": (135, 60, 185),
    "red": (215, 40, 40),
    "white": (245, 245, 245),
    "yellow": (240, 225, 50),
}
_COLOUR_NAMES = {rgb: name for name, rgb in PALETTE.items()}
QUESTION_TYPES: tuple[str, ...] = ("count", "presence", "colour", "position", "largest")
TEXT_TYPE = "fact"  # question type of the text-only samples (shape facts, no image)
# Files relative to the root, by role.
FILES: dict[str, str] = {
    "images": "images",
    "pretrain": "pretrain.json",
    "finetune": "finetune.json",
    "finetune_val": "finetune_val.json",
    "textvqa": "textvqa/TextVQA_val.json",
    "mmbench": "mmbench/mmbench_dev.tsv",
    "language_model": "language_model",
}
MMBENCH_COLUMNS = TSV_COLUMNS  # the MMBench dev TSV's columns, in order
# Prompt suffixes LLaVA-1.5's evaluation appends (short answers, MMBench options, TextVQA OCR hint): added
# to the vocabulary so an evaluation prompt does not tokenise to `<unk>`.
EVAL_PROMPTS: tuple[str, ...] = (
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Reference OCR token:",
    "A. B. C. D.",
)

_LLAVA_STREAM = 3  # SeedSequence stream after ImageNet (0), COCO (1) and ADE20K (2)
_TEXT_SPLIT = len(SPLITS)  # "split" key of the text-only samples' Generators
_PURPOSES = {"scene": 0, "finetune": 1, "textvqa": 2, "mmbench": 3, "format": 4}
# Bump when anything written here changes (the manifest version is [pixels, this]). 2: finetune.json mixes
# TextVQA-style and multiple-choice turns in.
_FORMAT_REVISION = 2
_MAX_INSTANCES = 4
_SCENE_TRIES = 10
_MIN_INSTANCE_PIXELS = 12  # every shape of a scene shows at least this many pixels (else resampled)
_CENTRE_RADIUS = 0.12  # position "centre": box centre within this (fraction of the side) of the middle
_SIDE_RADIUS = 0.22  # left/right/top/bottom: at least this far out ...
_SIDE_MARGIN = 0.12  # ... and this much further along its axis than along the other one
_LARGEST_RATIO = 1.5  # "largest" is asked when its area is this many times any other class's
_TEXT_FRACTION = 0.05  # text-only samples in finetune.json, relative to the train images
# Default shares of finetune.json image turns in the TextVQA prompt and in the multiple-choice prompt
# (plain if the type has no MMBench form); `prompt_mix` overrides them.
DEFAULT_PROMPT_MIX: dict[str, float] = {"textvqa": 0.25, "choice": 0.25}
_USE_OCR_SHARE = 0.5  # TextVQA-style turns that list the OCR tokens
_HINT_SHARE = 0.5  # multiple-choice turns (and MMBench rows) with the hint line
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_CAPTION_PROMPT = "Describe the image briefly."
_MMBENCH_HINT = "The image shows coloured shapes on a background."
_LANGUAGE_MODEL_DEFAULTS: dict[str, int] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_layers": 2,
    "num_heads": 4,
    "max_positions": 512,
    "seed": 0,
}
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


# ----------------------------------------------------------------------------------------- scene facts


@dataclass(frozen=True)
class SceneFacts:
    """What the questions are about, per instance in paint order (visible masks, so occlusion counts)."""

    classes: tuple[str, ...]
    colours: tuple[str, ...]  # PALETTE names
    areas: tuple[int, ...]  # visible pixels
    boxes: tuple[tuple[int, int, int, int], ...]  # visible boxes x0, y0, x1, y1 (exclusive ends)
    positions: tuple[str | None, ...]  # left/right/top/bottom/centre, None where ambiguous
    width: int
    height: int

    @property
    def count(self) -> int:
        return len(self.classes)

    def once(self) -> list[str]:
        """Classes present exactly once, in class order."""
        counts = Counter(self.classes)
        return [name for name in SHAPE_CLASSES if counts[name] == 1]

    def largest(self) -> str | None:
        """Class of the largest visible shape if it is clearly larger than every shape of another class."""
        if len(set(self.classes)) < 2:
            return None
        best = int(np.argmax(self.areas))
        rivals = [a for a, c in zip(self.areas, self.classes, strict=True) if c != self.classes[best]]
        return self.classes[best] if self.areas[best] >= _LARGEST_RATIO * max(rivals) else None

    def left_to_right(self) -> list[int]:
        """Instance indices ordered by visible box centre x (then y, then paint order)."""
        keys = [((b[0] + b[2]) / 2, (b[1] + b[3]) / 2, i) for i, b in enumerate(self.boxes)]
        return [i for _, _, i in sorted(keys)]


def _position(box: Sequence[int], width: int, height: int) -> str | None:
    """Region of the box centre, or None where it lies between regions (near a diagonal or a border)."""
    dx = (box[0] + box[2]) / 2 / width - 0.5
    dy = (box[1] + box[3]) / 2 / height - 0.5
    reach = max(abs(dx), abs(dy))
    if reach <= _CENTRE_RADIUS:
        return "centre"
    if reach < _SIDE_RADIUS:
        return None
    if abs(dx) >= abs(dy) + _SIDE_MARGIN:
        return "left" if dx < 0 else "right"
    if abs(dy) >= abs(dx) + _SIDE_MARGIN:
        return "top" if dy < 0 else "bottom"
    return None


def scene_facts(scene: Scene, masks: Sequence[np.ndarray] | None = None) -> SceneFacts:
    """Facts of a scene with palette colours (`llava_scene`); pass `masks` to avoid rasterising twice."""
    if masks is None:
        masks = render_instance_masks(scene)
    boxes = tuple((int(x0), int(y0), int(x1), int(y1)) for x0, y0, x1, y1 in instance_boxes(masks))
    return SceneFacts(
        classes=tuple(i.class_name for i in scene.instances),
        colours=tuple(_COLOUR_NAMES[i.colour] for i in scene.instances),
        areas=tuple(int(m.sum()) for m in masks),
        boxes=boxes,
        positions=tuple(_position(b, scene.width, scene.height) for b in boxes),
        width=scene.width,
        height=scene.height,
    )


def _rng(seed: int, split_code: int, index: int, purpose: str) -> np.random.Generator:
    sequence = np.random.SeedSequence([seed, _LLAVA_STREAM, split_code, index, _PURPOSES[purpose]])
    return np.random.default_rng(sequence)


def _palette_colour(
    rng: np.random.Generator, scene: Scene, others: Sequence[tuple[int, int, int]]
) -> tuple[int, int, int]:
    """A palette colour contrasting with the background and the shapes coloured so far (uniform among those
    that pass `synthetic._contrast`; the best one when none does)."""
    scores = {name: _contrast(rgb, scene.background, others) for name, rgb in PALETTE.items()}
    passing = [name for name, score in scores.items() if score >= 1.0]
    if passing:
        return PALETTE[passing[int(rng.integers(len(passing)))]]
    return PALETTE[max(scores, key=lambda name: scores[name])]


def llava_scene(seed: int, split: str, index: int, image_size: int) -> Scene:
    """The scene of image `index` (0-based) of `split`: a multi-object scene of 1-4 shapes recoloured from
    `PALETTE`, resampled until every shape shows at least `_MIN_INSTANCE_PIXELS` pixels."""
    rng = _rng(seed, SPLITS.index(split), index, "scene")
    scene = None
    for _ in range(_SCENE_TRIES):
        scene = sample_scene(rng, image_size, image_size, dominant=False, max_instances=_MAX_INSTANCES)
        if all(m.sum() >= _MIN_INSTANCE_PIXELS for m in render_instance_masks(scene)):
            break
    assert scene is not None
    instances: list[ShapeInstance] = []
    for instance in scene.instances:
        colour = _palette_colour(rng, scene, [i.colour for i in instances])
        instances.append(
            ShapeInstance(
                instance.class_index,
                instance.centre,
                instance.size,
                instance.rotation,
                colour,
                instance.aspect,
            )
        )
    return Scene(scene.width, scene.height, scene.background, tuple(instances))


# ------------------------------------------------------------------------------------------- questions


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


def _eligible(facts: SceneFacts) -> dict[str, list[str]]:
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


def _question(kind: str, facts: SceneFacts, rng: np.random.Generator) -> tuple[str, str]:
    """One (question, answer) of type `kind` about the scene; `rng` picks the shape asked about."""
    eligible = _eligible(facts)[kind]
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


def _conversation(sample_id: str, image: str | None, pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
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


def _finetune_turns(
    facts: SceneFacts, rng: np.random.Generator, format_rng: np.random.Generator, mix: dict[str, float]
) -> list[tuple[str, str, str]]:
    """(form, prompt, answer) of 2-3 questions of different types (random order) about one train scene:
    `rng` draws the questions, `format_rng` their prompt forms (`_formatted`)."""
    kinds = [k for k in QUESTION_TYPES if k in _eligible(facts)]
    chosen = rng.permutation(len(kinds))[: min(int(rng.integers(2, 4)), len(kinds))]
    turns = []
    for i in chosen:
        kind = kinds[int(i)]
        turns.append(_formatted(kind, *_question(kind, facts, rng), facts, format_rng, mix))
    return turns


def _text_pairs(seed: int, index: int) -> list[tuple[str, str]]:
    rng = _rng(seed, _TEXT_SPLIT, index, "finetune")
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


def _textvqa_entry(question_id: int, index: int, facts: SceneFacts, rng: np.random.Generator) -> dict:
    """One question on val image `index` with ten annotator answers: 6-10 exact, the rest variants (so the
    majority answer is always the true one)."""
    kinds = [k for k in QUESTION_TYPES if k in _eligible(facts)]
    kind = kinds[int(rng.integers(len(kinds)))]
    question, answer = _question(kind, facts, rng)
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


def _mmbench_row(index: int, facts: SceneFacts, png: bytes, rng: np.random.Generator) -> dict[str, Any]:
    """One multiple-choice row: presence has 2 options, colour 3, counting and position 4."""
    categories = [c for c, (kind, _) in _MMBENCH_CATEGORIES.items() if kind in _eligible(facts)]
    category = categories[int(rng.integers(len(categories)))]
    kind, l2_category = _MMBENCH_CATEGORIES[category]
    question, answer = _question(kind, facts, rng)
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


# ------------------------------------------------------------------------------------ majority baseline


def _qa_pairs(samples: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(type, plain question, plain answer) of every answered turn of image samples, in any prompt form
    (`split_prompt`): a multiple-choice letter is mapped back to the text of the option it picks."""
    pairs = []
    for sample in samples:
        if "image" not in sample:
            continue
        messages = sample["conversations"]
        for human, reply in zip(messages[::2], messages[1::2], strict=True):
            question, options = split_prompt(human["value"])
            answer = options.get(reply["value"], reply["value"]) if options else reply["value"]
            pairs.append((question_type(question), question, answer))
    return pairs


def _baseline(train: Sequence[dict[str, Any]], held_out: Sequence[dict[str, Any]]) -> dict[str, float]:
    answers: dict[str, Counter[str]] = {}
    for kind, _, answer in _qa_pairs(train):
        answers.setdefault(kind, Counter())[answer] += 1
    # Most frequent train answer per type; ties go to the alphabetically first answer.
    majority = {k: min(c.items(), key=lambda item: (-item[1], item[0]))[0] for k, c in answers.items()}
    hits: dict[str, list[bool]] = {}
    for kind, _, answer in _qa_pairs(held_out):
        hits.setdefault(kind, []).append(majority.get(kind) == answer)
    result = {kind: sum(h) / len(h) for kind, h in sorted(hits.items())}
    every = [hit for h in hits.values() for hit in h]
    result["overall"] = sum(every) / len(every) if every else 0.0
    return result


def majority_baseline(root: str | os.PathLike[str]) -> dict[str, float]:
    """Exact-match accuracy on `finetune_val.json` of always answering the most frequent `finetune.json`
    answer of the question's type: per type (`question_type`) and "overall" (over all held-out answers).

    Every train image turn counts once with its plain answer, whatever its prompt form: TextVQA-style turns
    with their answer as is, multiple-choice turns with the text of the option their letter picks (never
    the letter), so the baseline does not depend on which turns were drawn for which form."""
    root = Path(root)
    train = json.loads((root / FILES["finetune"]).read_text())
    held_out = json.loads((root / FILES["finetune_val"]).read_text())
    return _baseline(train, held_out)


# ---------------------------------------------------------------------------------------------- writer


def _language_model_args(language_model: dict[str, Any] | None) -> dict[str, int]:
    args = dict(_LANGUAGE_MODEL_DEFAULTS)
    if language_model is None:
        return args
    if not isinstance(language_model, dict):
        raise ValueError(f"language_model must be a dict of {sorted(args)} or None, got {language_model!r}")
    for key, value in language_model.items():
        if key not in args:
            raise ValueError(f"language_model.{key} is not an option; expected some of {sorted(args)}")
        low = 0 if key == "seed" else 1
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"language_model.{key} must be an integer >= {low}, got {value!r}")
        args[key] = int(value)
    if args["hidden_size"] % args["num_heads"]:
        raise ValueError(
            f"language_model.hidden_size ({args['hidden_size']}) must be divisible by "
            f"language_model.num_heads ({args['num_heads']})"
        )
    return args


def _prompt_mix(prompt_mix: dict[str, float] | None) -> dict[str, float]:
    mix = {**DEFAULT_PROMPT_MIX, **(prompt_mix or {})}
    unknown = sorted(set(mix) - set(DEFAULT_PROMPT_MIX))
    if unknown or any(not 0 <= v <= 1 for v in mix.values()) or sum(mix.values()) > 1:
        raise ValueError(
            f"prompt_mix: expected shares of {sorted(DEFAULT_PROMPT_MIX)} in [0, 1] summing to at most 1, "
            f"got {prompt_mix}"
        )
    return {k: float(v) for k, v in mix.items()}


def _manifest(
    train_images: int, val_images: int, image_size: int, seed: int, lm: dict[str, int], mix: dict[str, float]
) -> dict:
    return {
        "generator": __name__,
        "version": [GENERATOR_VERSION, _FORMAT_REVISION],
        "format": "llava",
        "classes": list(SHAPE_CLASSES),
        "args": {
            "train_images": int(train_images),
            "val_images": int(val_images),
            "image_size": int(image_size),
            "seed": int(seed),
            "language_model": lm,
            "prompt_mix": mix,
        },
        "counts": {"train": int(train_images), "val": int(val_images)},
        "files": dict(FILES),
        "question_types": list(QUESTION_TYPES),
        "palette": list(PALETTE),
    }


def _dump(path: Path, document: Any) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=1, ensure_ascii=False) + "\n"
    path.write_text(text)
    return text


def _texts(samples: Sequence[dict[str, Any]]) -> list[str]:
    return [m["value"] for s in samples for m in s["conversations"]]


def _vocabulary_extras() -> list[str]:
    """Every answer word and shape fact, so the vocabulary does not depend on which ones a small set drew."""
    words = [*PALETTE, *SHAPE_CLASSES, *_POSITIONS, *_NUMBERS, *map(str, range(10)), "yes", "no", "an"]
    return [" ".join(words), *(" ".join(fact) for fact in _FACTS)]


def _fill(
    temp: Path, train_images: int, val_images: int, image_size: int, seed: int, mix: dict, lm: dict, expected
):
    images = temp / FILES["images"]
    images.mkdir()
    pretrain, finetune, finetune_val, textvqa, mmbench = [], [], [], [], []
    forms: Counter[str] = Counter({"plain": 0, "textvqa": 0, "choice": 0})
    for split, count in (("train", train_images), ("val", val_images)):
        for index in range(count):
            scene = llava_scene(seed, split, index, image_size)
            facts = scene_facts(scene)
            stem = f"{split}_{index:05d}"
            buffer = io.BytesIO()
            render_image(scene).save(buffer, format="PNG")
            png = buffer.getvalue()
            (images / f"{stem}.png").write_bytes(png)
            if split == "train":
                pretrain.append(_conversation(stem, f"{stem}.png", [(_CAPTION_PROMPT, caption(facts))]))
                rng = _rng(seed, SPLITS.index(split), index, "finetune")
                format_rng = _rng(seed, SPLITS.index(split), index, "format")
                turns = _finetune_turns(facts, rng, format_rng, mix)
                forms.update(form for form, _, _ in turns)
                finetune.append(_conversation(stem, f"{stem}.png", [(q, a) for _, q, a in turns]))
                continue
            rng = _rng(seed, SPLITS.index(split), index, "finetune")
            for kind in QUESTION_TYPES:
                if kind in _eligible(facts):
                    pair = _question(kind, facts, rng)
                    finetune_val.append(_conversation(f"{stem}_{kind}", f"{stem}.png", [pair]))
            textvqa.append(
                _textvqa_entry(index, index, facts, _rng(seed, SPLITS.index(split), index, "textvqa"))
            )
            mmbench.append(_mmbench_row(index, facts, png, _rng(seed, SPLITS.index(split), index, "mmbench")))
    finetune += [
        _conversation(f"text_{i:05d}", None, _text_pairs(seed, i))
        for i in range(max(1, round(_TEXT_FRACTION * train_images)))
    ]
    _dump(temp / FILES["pretrain"], pretrain)
    _dump(temp / FILES["finetune"], finetune)
    _dump(temp / FILES["finetune_val"], finetune_val)
    _dump(temp / FILES["textvqa"], {"dataset_name": "textvqa", "dataset_type": "val", "data": textvqa})
    tsv = temp / FILES["mmbench"]
    tsv.parent.mkdir(parents=True)
    with tsv.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, MMBENCH_COLUMNS, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(mmbench)

    texts = [
        *_texts(pretrain),
        *_texts(finetune),
        *_texts(finetune_val),
        *EVAL_PROMPTS,
        *_vocabulary_extras(),
    ]
    texts += [t for e in textvqa for t in (e["question"], *e["answers"], *e["ocr_tokens"])]
    texts += [row[c] for row in mmbench for c in ("question", "hint", "A", "B", "C", "D", "answer")]
    write_tiny_language_model(temp / FILES["language_model"], texts, **lm)

    from transformers import AutoTokenizer

    vocab_size = len(AutoTokenizer.from_pretrained(temp / FILES["language_model"]))
    expected["counts"].update(
        pretrain=len(pretrain),
        finetune=len(finetune),
        finetune_text_only=sum("image" not in s for s in finetune),
        finetune_val=len(finetune_val),
        textvqa=len(textvqa),
        mmbench=len(mmbench),
    )
    expected["finetune_turn_forms"] = dict(forms)
    expected["vocab_size"] = vocab_size
    expected["majority_baselines"] = _baseline(finetune, finetune_val)
    expected["mmbench_chance"] = sum(1 / sum(bool(r[c]) for c in "ABCD") for r in mmbench) / len(mmbench)


def write_llava_layout(
    root: str | os.PathLike[str],
    *,
    train_images: int,
    val_images: int,
    image_size: int,
    seed: int,
    language_model: dict[str, Any] | None = None,
    prompt_mix: dict[str, float] | None = None,
) -> Path:
    """Write the LLaVA layout under `root`, all paths relative to it:

    - `images/train_<i:05d>.png`, `images/val_<i:05d>.png` (i from 0): the scenes (`llava_scene`);
    - `pretrain.json` (stage 1): per train image `{"id": "train_00000", "image": "train_00000.png",
      "conversations": [{"from": "human", "value": "<image>\\nDescribe the image briefly."},
      {"from": "gpt", "value": <caption>}]}` (`caption`);
    - `finetune.json` (stage 2): per train image 2-3 Q/A turns of different types (`<image>\\n` opens the
      first human turn only), each independently (`_formatted`) with probability `prompt_mix["textvqa"]`
      (default 0.25) in the TextVQA
      prompt (`textvqa_prompt(question, shape names left to right, use_ocr)`, use_ocr half the time; same
      answer), `prompt_mix["choice"]` (default 0.25) as multiple choice (`mmbench_prompt(Round(...),
      hint)` with the options of an MMBench
      row of that type rotated by a random shift and the hint half the time; answer = the option's
      upper-case letter; count, presence, colour and position only, "largest" stays plain) and plain
      otherwise; then `max(1, round(0.05 * train_images))` text-only samples `text_<i:05d>` (no "image"
      key, no placeholder, always plain) on shape facts;
    - `finetune_val.json`: per val image one single-turn sample `val_<i:05d>_<type>` per eligible type;
    - `textvqa/TextVQA_val.json`: TextVQA annotations, one question per val image (`question_id` = index),
      ten answers of which 6-10 are exact; `ocr_tokens` are the shape names (the scenes have no text);
    - `mmbench/mmbench_dev.tsv`: one MMBench row per val image (`MMBENCH_COLUMNS`, image as base64 PNG);
    - `language_model/`: `write_tiny_language_model` (arguments `language_model`, None = its defaults) over
      every text above, `EVAL_PROMPTS` and the conversation templates;
    - `piip_synthetic.json`: the manifest, with counts, `finetune_turn_forms` (image turns of
      `finetune.json` per form: plain, textvqa, choice), `vocab_size`, `majority_baselines` (see
      `majority_baseline`) and `mmbench_chance` (mean 1 / number of options).

    Atomic and refusing like `synthetic.write_imagenet_layout`."""
    _validate_dense_args(train_images=train_images, val_images=val_images, image_size=image_size, seed=seed)
    lm = _language_model_args(language_model)
    mix = _prompt_mix(prompt_mix)
    root = Path(root)
    expected = _manifest(train_images, val_images, image_size, seed, lm, mix)

    start = time.perf_counter()
    _write_atomically(
        root,
        expected,
        lambda temp: _fill(temp, train_images, val_images, image_size, seed, mix, lm, expected),
        "ensure_llava_layout",
    )
    log.info(
        "Generated synthetic LLaVA-layout shapes at %s: %d train + %d val images (%dpx), vocabulary %d, "
        "majority baseline %.3f, in %.1f s",
        root,
        train_images,
        val_images,
        image_size,
        expected["vocab_size"],
        expected["majority_baselines"]["overall"],
        time.perf_counter() - start,
    )
    return root


def _listing(expected: dict[str, Any]) -> list[tuple[Path, str, int]]:
    """(folder relative to root, glob pattern, expected count) of a complete layout."""
    counts = expected["counts"]
    listing = [(Path(FILES["images"]), f"{split}_*.png", counts[split]) for split in SPLITS]
    for key in ("pretrain", "finetune", "finetune_val", "textvqa", "mmbench"):
        path = Path(FILES[key])
        listing.append((path.parent, path.name, 1))
    model_files = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    listing += [(Path(FILES["language_model"]), name, 1) for name in model_files]
    return listing


EXTRA_LISTINGS["llava"] = _listing  # so synthetic._check_existing checks this layout's files


def ensure_llava_layout(
    root: str | os.PathLike[str],
    *,
    train_images: int,
    val_images: int,
    image_size: int,
    seed: int,
    language_model: dict[str, Any] | None = None,
    prompt_mix: dict[str, float] | None = None,
) -> Path:
    """`write_llava_layout` unless `root` already holds it: a `root` generated with the same arguments is
    reused (only the manifest and directory listings are read); one from other arguments, or not generated
    by piip, raises ValueError naming what differs. A concurrent writer that publishes first is reused."""
    _validate_dense_args(train_images=train_images, val_images=val_images, image_size=image_size, seed=seed)
    lm = _language_model_args(language_model)
    mix = _prompt_mix(prompt_mix)
    root = Path(root)
    expected = _manifest(train_images, val_images, image_size, seed, lm, mix)
    args = {"train_images": train_images, "val_images": val_images, "image_size": image_size, "seed": seed}
    write = lambda: write_llava_layout(root, language_model=lm, prompt_mix=mix, **args)  # noqa: E731
    return _ensure(root, expected, write, "LLaVA layout")
