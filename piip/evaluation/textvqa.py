"""VQA accuracy as the TextVQA / VQAv2 evaluators compute it, and per-question bookkeeping over ranks.

`normalize_answer` follows the EvalAI answer processor that LLaVA's TextVQA evaluator (the m4c one) applies
to the prediction and to every human answer; `vqa_accuracy` is the 10-annotator leave-one-out formula.
The metric classes keep one record per question id (first one wins, so a distributed sampler's padded
repeats count once); `state()` is picklable so ranks can `all_gather_object` it and rank 0 `merge`s.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from piip.errors import DataError
from piip.evaluation.questions import Question, QuestionSource
from piip.evaluation.records import AccuracyRecords

# Number words the official evaluator turns into digits.
NUMBER_WORDS: dict[str, str] = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})

# The official evaluator's contraction table, quirks included ("somebody'd" maps the other way; the
# capitalised keys can never match lower-cased text): the numbers it produces are only comparable if kept.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}

PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip

# The official pattern, verbatim: `(?!<=\d)` is a (harmless) typo for a look-behind and never rejects a
# match, so in effect every period not followed by a digit goes ("3.5" stays, "end." loses its period).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")


def normalize_answer(text: str) -> str:
    """The EvalAI/m4c answer normalisation, so that scores are comparable with published TextVQA numbers."""
    # 1. lower-case, drop every comma (digit grouping: "1,000" -> "1000") and "?", split off "'s"
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    # 2. newlines and tabs become spaces; strip the ends
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # 3. punctuation: deleted where it touches a space or the text has digit,digit (never, after step 1:
    #    kept as the official rule reads), else replaced by a space ("e-mail" -> "e mail")
    out = text
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or _DIGIT_COMMA_DIGIT.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    # 4. remove periods not followed by a digit (decimal points survive)
    out = _PERIOD_STRIP.sub("", out)
    # 5. number words -> digits, 6. drop articles, 7. expand contractions ("dont" -> "don't")
    words = [NUMBER_WORDS.get(word, word) for word in out.lower().split()]
    words = [CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
    # 8. re-join on single spaces
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official VQA score: the mean over annotators i of min(1, #matches among the others / 3).

    Leaving each annotator out in turn makes the 10-answer score consistent with the "3 humans agree" rule
    evaluated on every 9-answer subset; everything is compared after `normalize_answer`.
    """
    if isinstance(answers, str) or not answers:
        raise ValueError(
            f"vqa_accuracy needs a non-empty sequence of human answers, got {answers!r} "
            f"for prediction {prediction!r}"
        )
    predicted = normalize_answer(prediction)
    matches = [normalize_answer(answer) == predicted for answer in answers]
    total = sum(matches)
    # leaving out annotator i removes its own match (if any) from the count
    return sum(min(1.0, (total - own) / 3) for own in matches) / len(matches)


def textvqa_prompt(question: str, ocr_tokens: Sequence[str] | None, use_ocr: bool) -> str:
    """The LLaVA-1.5 TextVQA prompt: question, optional OCR reference tokens, the short-answer instruction."""
    prompt = question
    if use_ocr and ocr_tokens:
        prompt += "\nReference OCR token: " + ", ".join(ocr_tokens)
    return prompt + "\nAnswer the question using a single word or phrase."


class VQAAccuracy(AccuracyRecords):
    """TextVQA / VQAv2 accuracy: each question's reference is its (usually 10) human answers, scored by
    `vqa_accuracy`."""

    def score(self, prediction: str, reference: Sequence[str]) -> float:
        return vqa_accuracy(prediction, reference)


class TextVQA(QuestionSource):
    """TextVQA annotation JSON (`data`: question_id, image_id, question, answers, ocr_tokens), scored with
    the ten-annotator VQA accuracy; `use_ocr` adds the OCR tokens to the prompt (LLaVA-1.5's protocol)."""

    name = "textvqa"

    def __init__(
        self, file: Path, image_folder: Path, use_ocr: bool = True, max_new_tokens: int = 16
    ) -> None:
        self.file, self.image_folder = file, image_folder
        self.use_ocr, self.max_new_tokens = use_ocr, max_new_tokens

    def questions(self) -> list[Question]:
        if not self.file.is_file():
            raise DataError(f"TextVQA annotation file not found: {self.file}")
        entries = json.loads(self.file.read_text()).get("data")
        if not isinstance(entries, list):
            raise DataError(f"{self.file}: expected a TextVQA annotation file with a 'data' list")
        out = []
        for entry in entries:
            image_file = entry.get("image_file") or f"{entry['image_id']}.jpg"
            text = textvqa_prompt(entry["question"], entry.get("ocr_tokens"), self.use_ocr)
            meta = {"question_id": entry["question_id"], "answers": list(entry.get("answers", []))}
            out.append(Question(text, self.image_folder / image_file, meta))
        return out

    def metric(self) -> VQAAccuracy:
        return VQAAccuracy()

    def update(self, metric: VQAAccuracy, metas: list[dict[str, Any]], answers: list[str]) -> None:
        metric.update([m["question_id"] for m in metas], answers, [m["answers"] for m in metas])
