"""MMBench from its TSV release, with the circular evaluation that LLaVA-1.5 and the MMBench authors report.

Circular evaluation asks each n-option question n times with the option texts rotated, and credits the
question only if every round is answered correctly, so a model that guesses or prefers one letter cannot
score by position. `single_pass_accuracy` (round 0 = the original order) is reported alongside.
"""

from __future__ import annotations

import base64
import csv
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from piip.evaluation.questions import Question, QuestionSource
from piip.evaluation.records import QuestionRecords, plain_value

OPTION_LETTERS: tuple[str, ...] = ("A", "B", "C", "D")
TSV_COLUMNS: tuple[str, ...] = (
    "index", "question", "hint", *OPTION_LETTERS, "answer", "category", "l2-category", "split", "image",
)  # fmt: skip
REQUIRED_COLUMNS = tuple(c for c in TSV_COLUMNS if c != "answer")  # test splits carry no answers
MMBENCH_INSTRUCTION = "Answer with the option's letter from the given choices directly."

# Base64 images exceed csv's default 128 KiB field limit; 2**31 - 1 also fits a 32-bit C long (Windows).
_FIELD_SIZE_LIMIT = 2**31 - 1


@dataclass
class MMBenchQuestion:
    """One TSV row; `options` maps letters to texts for the non-empty options, in letter order."""

    index: int
    question: str
    hint: str | None
    options: dict[str, str]
    answer: str | None  # None where the file has no answer (test split)
    category: str
    l2_category: str
    split: str
    image_base64: str


@dataclass
class Round:
    """One circular round of a question: the options rotated by `round`, and where the answer moved to."""

    index: int
    round: int
    question: str
    options: dict[str, str]
    answer: str | None


def _is_missing(value: str | None) -> bool:
    """Empty cells and the "nan" that pandas-written files may hold both mean "no value"."""
    return value is None or value.strip() == "" or value.strip().lower() == "nan"


def _parse_row(path: Path, line: int, row: dict[str, str | None]) -> MMBenchQuestion:
    try:
        index = int(str(row["index"]).strip())
    except ValueError:
        raise ValueError(f"{path}, line {line}: index {row['index']!r} is not an integer") from None
    options: dict[str, str] = {}
    for letter in OPTION_LETTERS:
        text = row[letter]
        if _is_missing(text):
            continue
        if len(options) < OPTION_LETTERS.index(letter):
            # a gap (A, C without B) would change the letters once options are re-lettered in rounds
            raise ValueError(
                f"{path}: question index {index} has option {letter} but an earlier one is empty"
            )
        options[letter] = str(text)
    if len(options) < 2:
        raise ValueError(f"{path}: question index {index} has {len(options)} option(s); MMBench needs >= 2")
    answer = row.get("answer")
    if _is_missing(answer):
        answer = None
    else:
        answer = str(answer).strip()
        if answer not in options:
            raise ValueError(
                f"{path}: question index {index} has answer {answer!r}, not one of its options {[*options]}"
            )
    hint = row["hint"]
    return MMBenchQuestion(
        index=index,
        question=str(row["question"] or ""),
        hint=None if _is_missing(hint) else str(hint),
        options=options,
        answer=answer,
        category=str(row["category"] or ""),
        l2_category=str(row["l2-category"] or ""),
        split=str(row["split"] or ""),
        image_base64=str(row["image"] or ""),
    )


def read_mmbench_tsv(path: str | Path) -> list[MMBenchQuestion]:
    """The questions of an MMBench TSV; the `answer` column may be absent (test split), the others not."""
    path = Path(path)
    previous_limit = csv.field_size_limit(_FIELD_SIZE_LIMIT)
    try:
        with path.open(newline="", encoding="utf-8-sig") as file:
            reader = csv.DictReader(file, delimiter="\t")
            header = list(reader.fieldnames or [])
            missing = [column for column in REQUIRED_COLUMNS if column not in header]
            if missing:
                raise ValueError(f"{path}: MMBench TSV lacks column(s) {missing}; its header is {header}")
            # line_num after reading a row is its last physical line (1-based, header = line 1)
            return [_parse_row(path, reader.line_num, row) for row in reader]
    finally:
        csv.field_size_limit(previous_limit)


def circular_rounds(question: MMBenchQuestion) -> list[Round]:
    """n rounds for n options; round r puts the text of option (i + r) mod n under letter i.

    Round 1 thus shows the former B text under A; the answer letter moves back by r (mod n) accordingly.
    """
    letters = list(question.options)
    texts = list(question.options.values())
    count = len(letters)
    answer_position = None if question.answer is None else letters.index(question.answer)
    rounds = []
    for shift in range(count):
        options = {letter: texts[(position + shift) % count] for position, letter in enumerate(letters)}
        answer = None if answer_position is None else letters[(answer_position - shift) % count]
        rounds.append(Round(question.index, shift, question.question, options, answer))
    return rounds


def mmbench_prompt(round: Round, hint: str | None) -> str:
    """The LLaVA-1.5 MMBench prompt: optional hint line, question, "X. text" options, letter instruction."""
    lines = [round.question, *(f"{letter}. {text}" for letter, text in round.options.items())]
    prompt = "\n".join(lines) + "\n" + MMBENCH_INSTRUCTION
    return f"{hint}\n{prompt}" if hint else prompt


_WHOLE_REPLY_LETTER = re.compile(r"\(?([A-Za-z])\)?[.:)]?")  # "B", "b", "B.", "(B)", "B)", "B:"
_LEADING_LETTER = re.compile(r"(?:\(([A-Z])\)|([A-Z])[.:)])(?=\s)")  # "B) text", "B. text", "(B) text"
_ANSWER_IS = re.compile(r"(?i:\banswer(?:\s+is|\s*:)?)\s*(?i:option\s*)?\(?([A-Z])(?![\w'-])")
_LONE_LETTER = re.compile(r"(?<![\w'-])([A-Z])(?![\w'-])")
_LINKING_WORDS = frozenset({"or", "and", "nor", "but", "is", "was", "seems", "looks", "because"})


def _normalise_text(text: str) -> str:
    return " ".join(text.split()).casefold().rstrip(".")


def _single(candidates: set[str]) -> str | None:
    return next(iter(candidates)) if len(candidates) == 1 else None


def extract_choice(text: str, letters: Sequence[str], options: Mapping[str, str] | None = None) -> str | None:
    """The option letter a free-form reply picks, or None if it names none or several.

    Tried in order: the reply is just a letter; it starts with "B)" / "B." / "(B)"; it says "the answer is
    B"; it equals one option's text (case and spacing ignored, needs `options`); it mentions exactly one
    option letter as a standalone capital ("A" / "I" before a lower-case word other than "or", "is",
    ... read as English words).
    """
    allowed = set(letters)
    reply = text.strip()
    if not reply:
        return None
    match = _WHOLE_REPLY_LETTER.fullmatch(reply)
    if match:
        letter = match.group(1).upper()
        return letter if letter in allowed else None
    match = _LEADING_LETTER.match(reply)
    if match and (match.group(1) or match.group(2)) in allowed:
        return match.group(1) or match.group(2)
    stated = {letter for letter in _ANSWER_IS.findall(reply) if letter in allowed}
    if stated:
        return _single(stated)
    if options:
        wanted = _normalise_text(reply)
        equal = {letter for letter, option in options.items() if _normalise_text(option) == wanted}
        if equal & allowed:
            return _single(equal & allowed)
    mentioned: set[str] = set()
    for match in _LONE_LETTER.finditer(reply):
        letter = match.group(1)
        following = re.match(r" ([a-z]+)", reply[match.end() :])
        if letter in ("A", "I") and following and following.group(1) not in _LINKING_WORDS:
            continue  # "A dog", "I think": English words, not choices ("A or B", "A is right" are)
        if letter in allowed:
            mentioned.add(letter)
    return _single(mentioned)


class MMBenchCircular(QuestionRecords):
    """Circular MMBench accuracy over (question index, round) records, first record per pair kept.

    A question counts as right in circular accuracy only if all its rounds are present and right; a
    missing round (e.g. a crashed generation) counts as wrong. The number of rounds a question needs is
    the number of its options, known when `update` gets `options`; without them only the rounds 0..max
    seen can be required, so pass `options` whenever rounds might go missing.
    """

    key_fields = ("index", "round")

    def update(
        self,
        indices: Sequence[Any],
        rounds: Sequence[Any],
        predictions: Sequence[str],
        correct_letters: Sequence[str],
        categories: Sequence[str],
        options: Sequence[Mapping[str, str]] | None = None,
    ) -> None:
        """Score one batch of rounds; `predictions` are model replies (free text or letters).

        `options[i]` is the lettered options shown in that round: it gives the valid letters (else A-D),
        lets a reply that repeats an option's text count, and fixes how many rounds the question has.
        """
        sizes = [len(indices), len(rounds), len(predictions), len(correct_letters), len(categories)]
        if options is not None:
            sizes.append(len(options))
        if len(set(sizes)) != 1:
            raise ValueError(
                "MMBenchCircular.update: indices, rounds, predictions, correct_letters, categories"
                f"{', options' if options is not None else ''} have lengths {sizes}; they must match"
            )
        for position, index in enumerate(indices):
            shown = None if options is None else dict(options[position])
            letters = list(shown) if shown is not None else list(OPTION_LETTERS)
            correct = correct_letters[position]
            index, round_number = int(plain_value(index)), int(plain_value(rounds[position]))
            if correct not in letters:
                raise ValueError(
                    f"MMBenchCircular.update: question index {index} round {round_number} has correct letter "
                    f"{correct!r}, not one of {letters} (circular scoring needs a split with answers)"
                )
            choice = extract_choice(predictions[position], letters, shown)
            self._add(
                {
                    "index": index,
                    "round": round_number,
                    "prediction": predictions[position],
                    "choice": choice,
                    "answer": correct,
                    "correct": choice == correct,
                    "category": categories[position],
                    "num_rounds": None if shown is None else len(shown),
                }
            )

    def compute(self) -> dict[str, float]:
        """`circular_accuracy`, `single_pass_accuracy` (round 0), `count` and `circular/<category>`."""
        questions: dict[int, list[dict[str, Any]]] = {}
        for record in self._records.values():
            questions.setdefault(record["index"], []).append(record)
        circular_right = single_right = 0
        per_category: dict[str, list[int]] = {}  # category -> [right, total]
        for records in questions.values():
            correct = {record["round"]: record["correct"] for record in records}
            known = [record["num_rounds"] for record in records if record["num_rounds"] is not None]
            needed = range(max(known)) if known else range(max(correct) + 1)
            circular = all(correct.get(number, False) for number in needed)
            circular_right += circular
            single_right += correct.get(0, False)
            tally = per_category.setdefault(records[0]["category"], [0, 0])
            tally[0] += circular
            tally[1] += 1
        count = len(questions)
        scores: dict[str, float] = {
            "circular_accuracy": circular_right / count if count else math.nan,
            "single_pass_accuracy": single_right / count if count else math.nan,
            "count": count,
        }
        for category, (right, total) in sorted(per_category.items()):
            scores[f"circular/{category}"] = right / total
        return scores


class MMBench(QuestionSource):
    """MMBench TSV; every question is asked once per option rotation (circular evaluation)."""

    name = "mmbench"

    def __init__(self, file: Path, max_new_tokens: int = 8) -> None:
        self.file, self.max_new_tokens = file, max_new_tokens

    def questions(self) -> list[Question]:
        out = []
        for question in read_mmbench_tsv(self.file):
            image = base64.b64decode(question.image_base64) if question.image_base64 else None
            for round_ in circular_rounds(question):
                meta = {
                    "index": question.index,
                    "round": round_.round,
                    "letter": round_.answer,
                    "options": round_.options,
                    "category": question.category,
                }
                out.append(Question(mmbench_prompt(round_, question.hint), image, meta))
        return out

    def metric(self) -> MMBenchCircular:
        return MMBenchCircular()

    def update(self, metric: MMBenchCircular, metas: list[dict[str, Any]], answers: list[str]) -> None:
        metric.update(
            [m["index"] for m in metas],
            [m["round"] for m in metas],
            answers,
            [m["letter"] for m in metas],
            [m["category"] for m in metas],
            options=[m["options"] for m in metas],
        )
