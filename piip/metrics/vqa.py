"""VQA accuracy as the TextVQA / VQAv2 evaluators compute it, and per-question bookkeeping over ranks.

`normalize_answer` follows the EvalAI answer processor that LLaVA's TextVQA evaluator (the m4c one) applies
to the prediction and to every human answer; `vqa_accuracy` is the 10-annotator leave-one-out formula.
The metric classes keep one record per question id (first one wins, so a distributed sampler's padded
repeats count once); `state()` is picklable so ranks can `all_gather_object` it and rank 0 `merge`s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

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


def plain_value(value: Any) -> Any:
    """A 0-d tensor / numpy scalar as its Python value, so ids hash by value and pickle small."""
    item = getattr(value, "item", None)
    if callable(item) and not isinstance(value, (str, bytes)):
        return item()
    return value


class QuestionRecords:
    """One record (a dict) per key, first one kept; picklable `state()` and `merge()` for gathering.

    Subclasses name the fields that form the key in `key_fields` and add records with `_add`.
    """

    key_fields: tuple[str, ...] = ("question_id",)

    def __init__(self) -> None:
        self._records: dict[Hashable, dict[str, Any]] = {}

    def _add(self, record: dict[str, Any]) -> None:
        key = tuple(record[field] for field in self.key_fields)
        self._records.setdefault(key, record)  # a repeat (e.g. sampler padding) keeps the first record

    def reset(self) -> None:
        """Forget every record (call between evaluation epochs)."""
        self._records.clear()

    def records(self) -> list[dict[str, Any]]:
        """Copies of the records in insertion order, e.g. to write an answers file."""
        return [dict(record) for record in self._records.values()]

    def __len__(self) -> int:
        return len(self._records)

    def state(self) -> dict[str, Any]:
        """Plain-Python state for `torch.distributed.all_gather_object`."""
        return {"kind": type(self).__name__, "records": self.records()}

    def merge(self, states: Iterable[Mapping[str, Any]]) -> None:
        """Add gathered states' records; keys already held win, so the list may include our own state."""
        for number, state in enumerate(states):
            if not isinstance(state, Mapping) or "records" not in state:
                raise ValueError(f"state #{number} is not a {type(self).__name__}.state(): {type(state)}")
            kind = state.get("kind")
            if kind != type(self).__name__:
                raise ValueError(
                    f"state #{number} comes from {kind!r}, cannot merge into {type(self).__name__}"
                )
            for record in state["records"]:
                self._add(dict(record))


class _AccuracyRecords(QuestionRecords):
    """Per-question accuracy in [0, 1] from `score(prediction, reference)`; `compute()` averages them."""

    def score(self, prediction: str, reference: Any) -> float:
        raise NotImplementedError

    def update(
        self, question_ids: Sequence[Any], predictions: Sequence[str], references: Sequence[Any]
    ) -> None:
        """Score one batch; ids already seen (on this rank) keep their first record."""
        if not len(question_ids) == len(predictions) == len(references):
            raise ValueError(
                f"{type(self).__name__}.update: {len(question_ids)} question ids, {len(predictions)} "
                f"predictions and {len(references)} references; they must match one to one"
            )
        for question_id, prediction, reference in zip(question_ids, predictions, references, strict=True):
            question_id = plain_value(question_id)
            if (question_id,) in self._records:
                continue  # skip scoring a repeat: it would be dropped anyway
            self._add(
                {
                    "question_id": question_id,
                    "prediction": prediction,
                    "accuracy": self.score(prediction, reference),
                }
            )

    def compute(self) -> dict[str, float]:
        """`accuracy`: the mean over distinct questions (nan when there are none); `count`: how many."""
        count = len(self._records)
        total = sum(record["accuracy"] for record in self._records.values())
        return {"accuracy": total / count if count else math.nan, "count": count}


class VQAAccuracy(_AccuracyRecords):
    """TextVQA / VQAv2 accuracy: each question's reference is its (usually 10) human answers, scored by
    `vqa_accuracy`."""

    def score(self, prediction: str, reference: Sequence[str]) -> float:
        return vqa_accuracy(prediction, reference)


class AnswerAccuracy(_AccuracyRecords):
    """Exact match against a single reference answer (after `normalize_answer`), e.g. held-out toy QA."""

    def score(self, prediction: str, reference: str) -> float:
        return float(normalize_answer(prediction) == normalize_answer(reference))
