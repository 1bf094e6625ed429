"""VQA answer normalisation and accuracy, hand-checked against the official rules; per-question records."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from piip.evaluation.answers import AnswerAccuracy
from piip.evaluation.textvqa import VQAAccuracy, normalize_answer, textvqa_prompt, vqa_accuracy

# -- normalize_answer --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Cat", "cat"),  # lower-case, article "the" dropped
        ("An apple.", "apple"),  # trailing period removed, article "an" dropped
        ("a dog and the cat", "dog and cat"),  # articles dropped wherever they stand
        ("Two dogs", "2 dogs"),  # number words become digits
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),  # the table stops at ten
        ("dont", "don't"),  # contraction table
        ("isnt", "isn't"),
        ("whats", "what's"),
        ("youre", "you're"),
        ("what's", "what 's"),  # the m4c pre-tokeniser splits off "'s" (so it does not meet "whats")
        ("1,000", "1000"),  # digit grouping comma removed
        ("one, two", "1 2"),  # every comma goes, then number words
        ("3.5", "3.5"),  # a decimal point is followed by a digit: kept
        ("3.5.", "3.5"),  # the final period is not: removed
        ("Mr. Smith", "mr smith"),
        ("Yes!", "yes"),  # "!" touches no space: becomes a space, which the final split drops
        ("e-mail", "e mail"),  # "-" touches no space: becomes a space
        ("rock - paper", "rock paper"),  # " -" touches a space: deleted, then spaces collapse
        ("(A) the dog", "dog"),  # "(" -> space, ") " deleted, then "a" and "the" are articles
        ("What?", "what"),  # "?" always deleted
        ("  Coca\tCola\n", "coca cola"),  # tabs/newlines are spaces, ends stripped
        ("50%", "50%"),  # "%" is not in the punctuation list
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


# -- vqa_accuracy ------------------------------------------------------------------------------------------


def test_two_of_ten_matches():
    answers = ["yes"] * 2 + ["no"] * 8
    # each of the 2 "yes" annotators, left out, leaves 1 match -> 1/3; each of the 8 others leaves 2 -> 2/3
    # mean = (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6 / 10
    assert vqa_accuracy("yes", answers) == pytest.approx(0.6)


def test_one_of_ten_matches():
    answers = ["yes"] + ["no"] * 9
    # the "yes" annotator left out leaves 0 matches -> 0; each of the 9 others leaves 1 -> 1/3
    # mean = 9 * 1/3 / 10 = 0.3
    assert vqa_accuracy("yes", answers) == pytest.approx(0.3)


def test_three_of_ten_matches():
    answers = ["yes"] * 3 + ["no"] * 7
    # the 3 "yes" annotators each leave 2 -> 2/3; the 7 others leave 3 -> min(1, 3/3) = 1
    # mean = (3 * 2/3 + 7 * 1) / 10 = (2 + 7) / 10 = 0.9
    assert vqa_accuracy("yes", answers) == pytest.approx(0.9)


def test_four_or_more_matches_score_one():
    # 4 matches: the matching annotators leave 3 -> 1; the others leave 4 -> 1; mean = 1
    assert vqa_accuracy("yes", ["yes"] * 4 + ["no"] * 6) == pytest.approx(1.0)
    # 10 matches: everyone leaves 9 -> 1
    assert vqa_accuracy("yes", ["yes"] * 10) == pytest.approx(1.0)


def test_no_match_scores_zero():
    assert vqa_accuracy("maybe", ["yes"] * 5 + ["no"] * 5) == 0.0


def test_prediction_and_answers_are_normalised():
    # "Two" -> "2", "the 2" -> "2", "2." -> "2", "two," -> "2": 4 matches -> 1 (see above); "3" does not match
    answers = ["2", "the 2", "2.", "two,", "3", "3", "3", "3", "3", "3"]
    assert vqa_accuracy("Two", answers) == pytest.approx(1.0)


def test_fewer_than_ten_answers():
    # 3 answers, all "yes": each left out leaves 2 -> 2/3; mean = 2/3
    assert vqa_accuracy("yes", ["yes", "yes", "yes"]) == pytest.approx(2 / 3)


def test_empty_answers_raise():
    with pytest.raises(ValueError, match="non-empty sequence of human answers"):
        vqa_accuracy("yes", [])
    with pytest.raises(ValueError, match="non-empty sequence of human answers"):
        vqa_accuracy("yes", "yes")  # a bare string would be read as 3 one-letter answers


# -- textvqa_prompt ----------------------------------------------------------------------------------------


def test_textvqa_prompt_with_and_without_ocr():
    suffix = "\nAnswer the question using a single word or phrase."
    question = "What brand is this?"
    assert (
        textvqa_prompt(question, ["coca", "cola"], use_ocr=True)
        == "What brand is this?\nReference OCR token: coca, cola" + suffix
    )
    assert textvqa_prompt(question, ["coca", "cola"], use_ocr=False) == question + suffix
    assert textvqa_prompt(question, [], use_ocr=True) == question + suffix
    assert textvqa_prompt(question, None, use_ocr=True) == question + suffix


# -- VQAAccuracy / AnswerAccuracy --------------------------------------------------------------------------

ALL_YES = ["yes"] * 10
TWO_YES = ["yes"] * 2 + ["no"] * 8  # "yes" scores 0.6 and "no" scores 1 (see the tests above)


def test_repeated_question_id_counts_once_and_keeps_the_first():
    metric = VQAAccuracy()
    metric.update([1, 2], ["yes", "no"], [ALL_YES, ALL_YES])  # q1: 1.0, q2: 0.0
    metric.update([1], ["no"], [ALL_YES])  # padding repeat of q1 with another reply: ignored
    assert metric.compute() == {"accuracy": pytest.approx(0.5), "count": 2}
    assert metric.records() == [
        {"question_id": 1, "prediction": "yes", "accuracy": 1.0},
        {"question_id": 2, "prediction": "no", "accuracy": 0.0},
    ]


def test_tensor_ids_are_plain_ints():
    metric = VQAAccuracy()
    metric.update(torch.tensor([7, 8]), ["yes", "yes"], [ALL_YES, TWO_YES])
    metric.update(torch.tensor([7]), ["no"], [ALL_YES])  # same id as a tensor element: still a repeat
    assert [record["question_id"] for record in metric.records()] == [7, 8]
    assert all(type(record["question_id"]) is int for record in metric.records())
    assert metric.compute() == {"accuracy": pytest.approx((1.0 + 0.6) / 2), "count": 2}


def test_merge_of_two_rank_states():
    rank0, rank1 = VQAAccuracy(), VQAAccuracy()
    rank0.update(["a", "b"], ["yes", "yes"], [ALL_YES, TWO_YES])  # 1.0, 0.6
    rank1.update(["c", "a"], ["no", "no"], [TWO_YES, ALL_YES])  # 1.0, and a padded repeat of "a" (0.0)
    # what all_gather_object hands back: pickled copies, this rank's own state included
    gathered = [pickle.loads(pickle.dumps(state)) for state in (rank0.state(), rank1.state())]
    rank0.merge(gathered)
    # "a" keeps rank 0's record: (1.0 + 0.6 + 1.0) / 3 = 2.6 / 3
    assert rank0.compute() == {"accuracy": pytest.approx(2.6 / 3), "count": 3}
    assert [record["question_id"] for record in rank0.records()] == ["a", "b", "c"]
    fresh = VQAAccuracy()
    fresh.merge(gathered)
    assert fresh.records() == rank0.records()


def test_merge_rejects_foreign_states():
    with pytest.raises(ValueError, match="cannot merge into VQAAccuracy"):
        VQAAccuracy().merge([AnswerAccuracy().state()])
    with pytest.raises(ValueError, match="state #0"):
        VQAAccuracy().merge([{"accuracy": 1.0}])


def test_reset_and_empty_compute():
    metric = VQAAccuracy()
    metric.update([1], ["yes"], [ALL_YES])
    metric.reset()
    scores = metric.compute()
    assert scores["count"] == 0 and math.isnan(scores["accuracy"])
    assert metric.records() == []


def test_update_length_mismatch_raises():
    with pytest.raises(ValueError, match="2 question ids, 1 predictions and 2 references"):
        VQAAccuracy().update([1, 2], ["yes"], [ALL_YES, ALL_YES])


def test_answer_accuracy_exact_match_after_normalisation():
    metric = AnswerAccuracy()
    # "Two" ~ "2" -> 1; "The red cube." ~ "red cube" -> 1; "blue" vs "green" -> 0; repeat of q1 ignored
    metric.update([1, 2, 3, 1], ["Two", "The red cube.", "blue", "three"], ["2", "red cube", "green", "2"])
    assert metric.compute() == {"accuracy": pytest.approx(2 / 3), "count": 3}
    assert [record["accuracy"] for record in metric.records()] == [1.0, 1.0, 0.0]
    other = AnswerAccuracy()
    other.update([4], ["yes"], ["Yes"])  # 1
    metric.merge([other.state()])
    assert metric.compute() == {"accuracy": pytest.approx(3 / 4), "count": 4}
