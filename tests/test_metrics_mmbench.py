"""MMBench TSV reading, circular rounds, the LLaVA-1.5 prompt, reply parsing and circular scoring."""

from __future__ import annotations

import csv
import math
import pickle
from pathlib import Path

import pytest

from piip.evaluation.mmbench import (
    MMBenchCircular,
    Round,
    circular_rounds,
    extract_choice,
    mmbench_prompt,
    read_mmbench_tsv,
)

HEADER = [
    "index",
    "question",
    "hint",
    "A",
    "B",
    "C",
    "D",
    "answer",
    "category",
    "l2-category",
    "split",
    "image",
]
BIG_IMAGE = "iVBORw0KGgo" + "A" * 200_000  # larger than csv's default 128 KiB field limit
INSTRUCTION = "Answer with the option's letter from the given choices directly."


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    """As pandas writes it: tab-separated, fields with a newline or quote are double-quoted."""
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, delimiter="\t", lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


# index 10: 3 options (D is "nan", as pandas writes a missing value), no hint; answer B = "dog"
# index 11: 4 options, a two-line hint; answer D = "yellow"
ROWS = [
    ["10", "Which animal is shown?", "", "cat", "dog", "bird", "nan", "B", "animals", "perception", "dev",
     BIG_IMAGE],
    ["11", "What color is the sun in this drawing?", "Look at the top.\nIt is a child's drawing.", "red",
     "blue", "green", "yellow", "D", "color", "perception", "dev", "aGVsbG8="],
]  # fmt: skip


@pytest.fixture
def questions(tmp_path):
    return read_mmbench_tsv(write_tsv(tmp_path / "mmbench_dev.tsv", HEADER, ROWS))


# -- reading -----------------------------------------------------------------------------------------------


def test_read_tsv(questions):
    animal, sun = questions
    assert animal.index == 10 and sun.index == 11
    assert animal.question == "Which animal is shown?"
    assert animal.hint is None  # empty cell
    assert animal.options == {"A": "cat", "B": "dog", "C": "bird"}  # "nan" D dropped
    assert animal.answer == "B"
    assert (animal.category, animal.l2_category, animal.split) == ("animals", "perception", "dev")
    assert animal.image_base64 == BIG_IMAGE
    assert sun.hint == "Look at the top.\nIt is a child's drawing."  # quoted multi-line field
    assert sun.options == {"A": "red", "B": "blue", "C": "green", "D": "yellow"}
    assert sun.answer == "D"


def test_reading_restores_the_csv_field_size_limit(tmp_path):
    before = csv.field_size_limit()
    read_mmbench_tsv(write_tsv(tmp_path / "dev.tsv", HEADER, ROWS))
    assert csv.field_size_limit() == before


def test_missing_columns_name_the_file_and_columns(tmp_path):
    header = [column for column in HEADER if column not in ("l2-category", "split")]
    rows = [[value for column, value in zip(HEADER, row, strict=True) if column in header] for row in ROWS]
    path = write_tsv(tmp_path / "cut.tsv", header, rows)
    with pytest.raises(ValueError, match=r"cut\.tsv.*\['l2-category', 'split'\]"):
        read_mmbench_tsv(path)


def test_answer_outside_the_options_names_file_and_index(tmp_path):
    rows = [ROWS[0][:7] + ["D"] + ROWS[0][8:]]  # index 10 has no option D
    path = write_tsv(tmp_path / "bad_answer.tsv", HEADER, rows)
    with pytest.raises(ValueError, match=r"bad_answer\.tsv: question index 10 has answer 'D'"):
        read_mmbench_tsv(path)


def test_missing_answer_column_reads_as_none(tmp_path):
    header = [column for column in HEADER if column != "answer"]
    rows = [[value for column, value in zip(HEADER, row, strict=True) if column != "answer"] for row in ROWS]
    animal, _ = read_mmbench_tsv(write_tsv(tmp_path / "test_split.tsv", header, rows))
    assert animal.answer is None
    assert [round.answer for round in circular_rounds(animal)] == [None, None, None]


# -- rounds and prompt -------------------------------------------------------------------------------------


def test_rounds_of_a_three_option_question(questions):
    rounds = circular_rounds(questions[0])
    # the texts move up one letter per round; "dog" (the answer) goes B -> A -> C
    assert [(r.index, r.round, r.options, r.answer) for r in rounds] == [
        (10, 0, {"A": "cat", "B": "dog", "C": "bird"}, "B"),
        (10, 1, {"A": "dog", "B": "bird", "C": "cat"}, "A"),
        (10, 2, {"A": "bird", "B": "cat", "C": "dog"}, "C"),
    ]


def test_rounds_of_a_four_option_question(questions):
    rounds = circular_rounds(questions[1])
    # "yellow" (the answer) goes D -> C -> B -> A
    assert [(r.options, r.answer) for r in rounds] == [
        ({"A": "red", "B": "blue", "C": "green", "D": "yellow"}, "D"),
        ({"A": "blue", "B": "green", "C": "yellow", "D": "red"}, "C"),
        ({"A": "green", "B": "yellow", "C": "red", "D": "blue"}, "B"),
        ({"A": "yellow", "B": "red", "C": "blue", "D": "green"}, "A"),
    ]


def test_prompt_without_hint(questions):
    round1 = circular_rounds(questions[0])[1]
    assert mmbench_prompt(round1, questions[0].hint) == (
        "Which animal is shown?\nA. dog\nB. bird\nC. cat\n"
        "Answer with the option's letter from the given choices directly."
    )


def test_prompt_with_hint(questions):
    round0 = circular_rounds(questions[1])[0]
    assert mmbench_prompt(round0, questions[1].hint) == (
        "Look at the top.\nIt is a child's drawing.\nWhat color is the sun in this drawing?\n"
        "A. red\nB. blue\nC. green\nD. yellow\n"
        "Answer with the option's letter from the given choices directly."
    )


# -- extract_choice ----------------------------------------------------------------------------------------

OPTIONS = {"A": "cat", "B": "dog", "C": "bird"}


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("B", "B"),
        ("b", "B"),
        ("B.", "B"),
        ("(B)", "B"),
        ("  C  ", "C"),
        ("B) dog", "B"),
        ("B. dog", "B"),
        ("(C) bird", "C"),
        ("The answer is B", "B"),
        ("The answer is B.", "B"),
        ("Answer: (A)", "A"),
        ("I think it is C.", "C"),  # "I" before a lower-case word is the pronoun
        ("dog", "B"),  # the text of option B
        ("  Dog. ", "B"),  # case, spaces and a final period ignored
        ("D", None),  # not an option of this question
        ("A or B", None),  # two letters: ambiguous
        ("The answer is A, no, the answer is B", None),
        ("A dog", None),  # "A" as an article; "a dog" is not an option text
        ("A is correct.", "A"),  # "A" before "is" is the letter
        ("It is a bird, so C", "C"),  # lower-case "a" is never a choice
        ("", None),
        ("I do not know", None),
    ],
)
def test_extract_choice(reply, expected):
    assert extract_choice(reply, ["A", "B", "C"], OPTIONS) == expected


def test_extract_choice_without_options_cannot_match_texts():
    assert extract_choice("dog", ["A", "B", "C"]) is None
    assert extract_choice("B", ["A", "B", "C"]) == "B"


# -- circular scoring --------------------------------------------------------------------------------------


def batch(rounds: list[Round], replies: list[str], category: str) -> dict:
    """The keyword arguments of MMBenchCircular.update for a list of rounds."""
    return dict(
        indices=[r.index for r in rounds],
        rounds=[r.round for r in rounds],
        predictions=replies,
        correct_letters=[r.answer for r in rounds],
        categories=[category] * len(rounds),
        options=[r.options for r in rounds],
    )


def test_one_question_right_everywhere_one_wrong_in_one_round(questions):
    animal, sun = (circular_rounds(question) for question in questions)
    metric = MMBenchCircular()
    # animal: answers B, A, C (see above), given as a letter, "(A)" and the option text -> all right
    metric.update(**batch(animal, ["B", "(A)", "dog"], "animals"))
    # sun: answers D, C, B, A; round 3 replies "B" -> wrong
    metric.update(**batch(sun, ["D", "C. yellow", "The answer is B", "B"], "color"))
    # circular: animal right, sun wrong -> 1/2; round 0: both right -> 2/2
    assert metric.compute() == {
        "circular_accuracy": pytest.approx(0.5),
        "single_pass_accuracy": pytest.approx(1.0),
        "count": 2,
        "circular/animals": pytest.approx(1.0),
        "circular/color": pytest.approx(0.0),
    }
    record = metric.records()[2]
    assert record == {
        "index": 10,
        "round": 2,
        "prediction": "dog",
        "choice": "C",
        "answer": "C",
        "correct": True,
        "category": "animals",
        "num_rounds": 3,
    }


def test_wrong_first_round_lowers_single_pass(questions):
    animal, sun = (circular_rounds(question) for question in questions)
    metric = MMBenchCircular()
    metric.update(**batch(animal, ["B", "A", "C"], "animals"))
    metric.update(**batch(sun, ["A", "C", "B", "A"], "color"))  # round 0 answer is D
    scores = metric.compute()
    # circular 1/2 as before; round 0: animal right, sun wrong -> 1/2
    assert scores["circular_accuracy"] == pytest.approx(0.5)
    assert scores["single_pass_accuracy"] == pytest.approx(0.5)


def test_a_missing_round_counts_as_wrong(questions):
    animal = circular_rounds(questions[0])
    metric = MMBenchCircular()
    metric.update(**batch(animal[:2], ["B", "A"], "animals"))  # right in rounds 0, 1; round 2 never scored
    scores = metric.compute()
    assert scores["circular_accuracy"] == 0.0
    assert scores["single_pass_accuracy"] == 1.0
    assert scores["count"] == 1


def test_without_options_only_rounds_up_to_the_last_seen_are_required(questions):
    animal = circular_rounds(questions[0])
    metric = MMBenchCircular()
    kwargs = batch(animal[:2], ["B", "A"], "animals")
    del kwargs["options"]
    metric.update(**kwargs)
    # rounds 0 and 1 seen and right; with no options the third round cannot be known to be missing
    assert metric.compute()["circular_accuracy"] == 1.0
    metric.reset()
    kwargs = batch([animal[0], animal[2]], ["B", "C"], "animals")
    del kwargs["options"]
    metric.update(**kwargs)  # round 1 is missing below the last seen round 2 -> wrong
    assert metric.compute()["circular_accuracy"] == 0.0


def test_merge_over_ranks_with_a_padded_repeat(questions):
    animal, sun = (circular_rounds(question) for question in questions)
    rank0, rank1 = MMBenchCircular(), MMBenchCircular()
    rank0.update(**batch(animal[:2], ["B", "A"], "animals"))
    rank0.update(**batch(sun[:2], ["D", "C"], "color"))
    rank1.update(**batch(animal[2:], ["C"], "animals"))
    rank1.update(**batch(sun[2:], ["B", "B"], "color"))  # round 3 wrong
    rank1.update(**batch(animal[:1], ["A"], "animals"))  # padding repeat of (10, 0), wrong this time: ignored
    gathered = [pickle.loads(pickle.dumps(state)) for state in (rank0.state(), rank1.state())]
    rank0.merge(gathered)
    assert len(rank0) == 7  # 3 + 4 distinct (index, round) pairs
    scores = rank0.compute()
    assert scores["circular_accuracy"] == pytest.approx(0.5)
    assert scores["single_pass_accuracy"] == pytest.approx(1.0)
    assert scores["count"] == 2


def test_update_checks(questions):
    animal = circular_rounds(questions[0])
    metric = MMBenchCircular()
    kwargs = batch(animal, ["B", "A", "C"], "animals")
    kwargs["predictions"] = ["B"]
    with pytest.raises(ValueError, match=r"lengths \[3, 3, 1, 3, 3, 3\]"):
        metric.update(**kwargs)
    kwargs = batch(animal, ["B", "A", "C"], "animals")
    kwargs["correct_letters"] = [None, "A", "C"]
    with pytest.raises(ValueError, match="question index 10 round 0 has correct letter None"):
        metric.update(**kwargs)


def test_empty_compute_is_nan():
    scores = MMBenchCircular().compute()
    assert scores["count"] == 0 and math.isnan(scores["circular_accuracy"])
