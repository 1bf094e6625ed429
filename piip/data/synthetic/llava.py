"""The LLaVA layout of the shapes data: captions, visual Q/A, TextVQA and MMBench files, and the tiny
language model (tokenizer + random Llama) whose vocabulary covers every text written.

Scenes come from `llava_scenes`, questions and their prompt forms from `llava_questions`; this module
writes the files, builds the language model over their texts and publishes the directory through
`publish`. `finetune.json` asks about a quarter of its image questions in the TextVQA prompt and a quarter
as multiple choice by default (`DEFAULT_PROMPT_MIX`, `prompt_mix`); the held-out val files keep their plain
/ benchmark forms. `majority_baseline` scores always answering the most frequent train answer.

Layout under `root` (see `write_llava_layout`): `images/{train,val}_<index:05d>.png`, `pretrain.json`,
`finetune.json`, `finetune_val.json`, `textvqa/TextVQA_val.json`, `mmbench/mmbench_dev.tsv`,
`language_model/` and the manifest `piip_synthetic.json`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from piip.data.synthetic.dense_layouts import validate_dense_args
from piip.data.synthetic.language_model import write_tiny_language_model
from piip.data.synthetic.llava_questions import (
    QUESTION_TYPES,
    caption,
    conversation_sample,
    eligible_questions,
    fact_pairs,
    finetune_turns,
    make_question,
    mmbench_row,
    question_type,
    split_prompt,
    textvqa_entry,
    vocabulary_extras,
)
from piip.data.synthetic.llava_scenes import PALETTE, llava_rng, llava_scene, scene_facts
from piip.data.synthetic.publish import check_listing, ensure_layout, write_atomically
from piip.data.synthetic.render import render_image
from piip.data.synthetic.scene import GENERATOR_VERSION, SHAPE_CLASSES, SPLITS
from piip.evaluation.mmbench import TSV_COLUMNS

__all__ = [
    "DEFAULT_PROMPT_MIX",
    "EVAL_PROMPTS",
    "FILES",
    "MMBENCH_COLUMNS",
    "ensure_llava_layout",
    "majority_baseline",
    "write_llava_layout",
]

log = logging.getLogger(__name__)

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

# The manifest's "generator" (this module's name, fixed so that a move or rename keeps directories reusable).
_GENERATOR_ID = "piip.data.synthetic.llava"
# Bump when anything written here changes (the manifest version is [pixels, this]). 2: finetune.json mixes
# TextVQA-style and multiple-choice turns in.
_FORMAT_REVISION = 2
_TEXT_FRACTION = 0.05  # text-only samples in finetune.json, relative to the train images
# Default shares of finetune.json image turns in the TextVQA prompt and in the multiple-choice prompt
# (plain if the type has no MMBench form); `prompt_mix` overrides them.
DEFAULT_PROMPT_MIX: dict[str, float] = {"textvqa": 0.25, "choice": 0.25}
_CAPTION_PROMPT = "Describe the image briefly."
_LANGUAGE_MODEL_DEFAULTS: dict[str, int] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_layers": 2,
    "num_heads": 4,
    "max_positions": 512,
    "seed": 0,
}


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
        "generator": _GENERATOR_ID,
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
                pretrain.append(conversation_sample(stem, f"{stem}.png", [(_CAPTION_PROMPT, caption(facts))]))
                rng = llava_rng(seed, SPLITS.index(split), index, "finetune")
                format_rng = llava_rng(seed, SPLITS.index(split), index, "format")
                turns = finetune_turns(facts, rng, format_rng, mix)
                forms.update(form for form, _, _ in turns)
                finetune.append(conversation_sample(stem, f"{stem}.png", [(q, a) for _, q, a in turns]))
                continue
            rng = llava_rng(seed, SPLITS.index(split), index, "finetune")
            for kind in QUESTION_TYPES:
                if kind in eligible_questions(facts):
                    pair = make_question(kind, facts, rng)
                    finetune_val.append(conversation_sample(f"{stem}_{kind}", f"{stem}.png", [pair]))
            textvqa.append(
                textvqa_entry(index, index, facts, llava_rng(seed, SPLITS.index(split), index, "textvqa"))
            )
            mmbench.append(
                mmbench_row(index, facts, png, llava_rng(seed, SPLITS.index(split), index, "mmbench"))
            )
    finetune += [
        conversation_sample(f"text_{i:05d}", None, fact_pairs(seed, i))
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
        *vocabulary_extras(),
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
      first human turn only), each independently (`llava_questions.finetune_turns`) with probability
      `prompt_mix["textvqa"]` (default 0.25) in the TextVQA prompt (`textvqa_prompt(question, shape names
      left to right, use_ocr)`, use_ocr half the time; same answer), `prompt_mix["choice"]` (default 0.25)
      as multiple choice (`mmbench_prompt(Round(...), hint)` with the options of an MMBench row of that
      type rotated by a random shift and the hint half the time; answer = the option's upper-case letter;
      count, presence, colour and position only, "largest" stays plain) and plain otherwise; then
      `max(1, round(0.05 * train_images))` text-only samples `text_<i:05d>` (no "image" key, no
      placeholder, always plain) on shape facts;
    - `finetune_val.json`: per val image one single-turn sample `val_<i:05d>_<type>` per eligible type;
    - `textvqa/TextVQA_val.json`: TextVQA annotations, one question per val image (`question_id` = index),
      ten answers of which 6-10 are exact; `ocr_tokens` are the shape names (the scenes have no text);
    - `mmbench/mmbench_dev.tsv`: one MMBench row per val image (`MMBENCH_COLUMNS`, image as base64 PNG);
    - `language_model/`: `write_tiny_language_model` (arguments `language_model`, None = its defaults) over
      every text above, `EVAL_PROMPTS` and the conversation templates;
    - `piip_synthetic.json`: the manifest, with counts, `finetune_turn_forms` (image turns of
      `finetune.json` per form: plain, textvqa, choice), `vocab_size`, `majority_baselines` (see
      `majority_baseline`) and `mmbench_chance` (mean 1 / number of options).

    Atomic and refusing like `imagenet.write_imagenet_layout`."""
    validate_dense_args(train_images=train_images, val_images=val_images, image_size=image_size, seed=seed)
    lm = _language_model_args(language_model)
    mix = _prompt_mix(prompt_mix)
    root = Path(root)
    expected = _manifest(train_images, val_images, image_size, seed, lm, mix)

    start = time.perf_counter()
    write_atomically(
        root,
        expected,
        lambda temp: _fill(temp, train_images, val_images, image_size, seed, mix, lm, expected),
        "ensure_llava_layout",
        _check_files,
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


def _check_files(root: Path, expected: dict[str, Any]) -> None:
    """Cheap completeness check (directory listings only): the images, the json, TSV and model files."""
    counts = expected["counts"]
    listing = [(Path(FILES["images"]), f"{split}_*.png", counts[split]) for split in SPLITS]
    for key in ("pretrain", "finetune", "finetune_val", "textvqa", "mmbench"):
        path = Path(FILES[key])
        listing.append((path.parent, path.name, 1))
    model_files = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    listing += [(Path(FILES["language_model"]), name, 1) for name in model_files]
    check_listing(root, listing)


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
    validate_dense_args(train_images=train_images, val_images=val_images, image_size=image_size, seed=seed)
    lm = _language_model_args(language_model)
    mix = _prompt_mix(prompt_mix)
    root = Path(root)
    expected = _manifest(train_images, val_images, image_size, seed, lm, mix)
    args = {"train_images": train_images, "val_images": val_images, "image_size": image_size, "seed": seed}
    write = lambda: write_llava_layout(root, language_model=lm, prompt_mix=mix, **args)  # noqa: E731
    return ensure_layout(root, expected, write, "LLaVA layout", _check_files)
