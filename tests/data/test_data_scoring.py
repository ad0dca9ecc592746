import doctest

import pytest

from spearfl.data import scoring
from spearfl.data.schema import Example
from spearfl.data.scoring import (
    answer_text,
    completion_has_answer,
    gold_answer,
    is_correct,
    normalise_text,
    parse_answer,
    parse_number,
)

FOUR = Example("t/four", "Capital of France?", ("Rome", "Paris", "Oslo", "Madrid"), gold=1)
GOLD_A = Example("t/gold-a", "Largest planet?", ("Jupiter", "Mars", "Venus", "Earth"), gold=0)
THREE = Example("t/three", "Which is a gas?", ("ice", "steam", "water"), gold=1)
FIVE = Example("t/five", "2 + 3 = ?", ("4", "6", "7", "8", "5"), gold=4)
NUMBERED = Example("t/numbered", "Pick the fruit.", ("car", "apple", "stone"), gold=1, label_style="numbers")
YES_NO = Example("t/yes-no", "Is the sky blue?", ("Yes", "No"), gold=1, label_style="text")
GSM = Example("t/gsm", "How much?", answer="1234")
NEGATIVE = Example("t/negative", "Temperature?", answer="-3.5")


def test_doctests_pass():
    assert doctest.testmod(scoring).failed == 0


@pytest.mark.parametrize(
    "completion, label",
    [
        ("Answer: B", "B"),
        ("Answer: (B)", "B"),
        ("Answer: B)", "B"),
        ("Answer: B.", "B"),
        ("Answer: B:", "B"),
        ("Answer: **B**", "B"),
        ("Answer: 'B'", "B"),
        ("Answer: `B`", "B"),
        ("Answer: B. Paris", "B"),
        ("Answer: B Paris", "B"),
        ("**Answer:** B", "B"),
        ("Answer:\nB\n", "B"),
        ("Answer: Paris", "B"),
        ("Answer: paris.", "B"),
    ],
)
def test_letter_label_forms(completion, label):
    assert parse_answer(FOUR, completion) == label


@pytest.mark.parametrize(
    "completion",
    ["Answer: a", "Answer: a city", "Answer: A city in Europe", "Answer: b", "Answer: E", "Answer: I think B", "no marker B", "Answer:"],
)
def test_unparseable_answers(completion):
    assert parse_answer(FOUR, completion) is None


def test_article_a_is_not_option_a():
    assert parse_answer(GOLD_A, "Answer: a") is None
    assert not is_correct(GOLD_A, "Answer: a planet")


def test_gold_index_zero_is_scorable():
    assert gold_answer(GOLD_A) == "A"
    assert is_correct(GOLD_A, "Answer: A")
    assert is_correct(GOLD_A, "Answer: (A) Jupiter")
    assert not is_correct(GOLD_A, "Answer: B")


def test_only_first_marker_counts():
    assert parse_answer(FOUR, "Answer: C\nAnswer: B") == "C"
    assert not is_correct(FOUR, "Answer: C\nWait.\nAnswer: B")
    assert parse_answer(FOUR, "Answer: nothing\nAnswer: B") is None


def test_with_chain_of_thought_the_last_declared_answer_counts():
    reasoning = "Option A looks right. Answer: A\nBut the text says otherwise, so\nAnswer: C\n"
    assert parse_answer(FOUR, reasoning, last=True) == "C" and parse_answer(FOUR, reasoning) == "A"
    assert is_correct(Example("f/0", "2 + 3?", answer="5"), "3 + 2 = 5. Answer: 4\nNo, 5.\nAnswer: 5", last=True)
    assert parse_answer(FOUR, "Answer: B\nAnswer: nothing", last=True) is None


def test_three_and_five_option_questions():
    assert is_correct(THREE, "Answer: B")
    assert parse_answer(THREE, "Answer: D") is None
    assert is_correct(FIVE, "Answer: E")
    assert is_correct(FIVE, "Answer: (E) 5")
    assert parse_answer(FIVE, "Answer: 5") == "E"


def test_many_letter_options_reach_z():
    example = Example("t/26", "Pick the last.", tuple(f"option {index}" for index in range(26)), gold=25)
    assert is_correct(example, "Answer: Z")
    assert parse_answer(example, "Answer: I think Z") is None


def test_numbered_labels():
    assert is_correct(NUMBERED, "Answer: 2")
    assert is_correct(NUMBERED, "Answer: (2)")
    assert is_correct(NUMBERED, "Answer: 2. apple")
    assert parse_answer(NUMBERED, "Answer: 4") is None
    assert parse_answer(NUMBERED, "Answer: 2.5") is None
    assert parse_answer(NUMBERED, "Answer: B") is None


def test_text_labels_yes_no():
    assert is_correct(YES_NO, "Answer: No")
    assert is_correct(YES_NO, "Answer: no.")
    assert is_correct(YES_NO, "Answer: No, because of scattering.")
    # The option "written exactly as it is listed": wrapped answers are a format error, not the option.
    assert parse_answer(YES_NO, "Answer: **No**") is None
    assert parse_answer(YES_NO, 'Answer: "No"') is None
    assert parse_answer(YES_NO, "Answer: Yes") == "Yes"
    assert parse_answer(YES_NO, "Answer: No one knows") is None
    assert parse_answer(YES_NO, "Answer: B") is None
    assert parse_answer(YES_NO, "Answer: maybe") is None


def test_text_labels_prefer_verbatim_over_normalised():
    example = Example("t/case", "Lowercase of 'TeSt'?", ("test", "TEST", "TeSt"), gold=0, label_style="text")
    assert is_correct(example, "Answer: test")
    assert parse_answer(example, "Answer: TEST") == "TEST"
    assert parse_answer(example, "Answer: Test") is None


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("Answer: 1,234", "1234"),
        ("Answer: $1,234.00", "1234"),
        ("Answer: 1234.", "1234"),
        ("Answer: The total is $1,234 dollars", "1234"),
        ("Answer: 1234 and later 5", "1234"),
    ],
)
def test_free_form_numbers(completion, expected):
    assert parse_answer(GSM, completion) == expected
    assert is_correct(GSM, completion)


def test_free_form_decimals_and_negatives():
    assert is_correct(NEGATIVE, "Answer: -3.50")
    assert not is_correct(NEGATIVE, "Answer: 3.5")
    assert is_correct(Example("t/18", "q", answer="18"), "Answer: 18.0")
    assert parse_answer(GSM, "Answer: none") is None
    assert not is_correct(GSM, "Reasoning 1234.\nAnswer: 1233\nAnswer: 1234")


def test_free_form_text_answer_compares_normalised():
    example = Example("t/text", "Capital of France?", answer="Paris")
    assert is_correct(example, "Answer: paris.")
    assert not is_correct(example, "Answer: Rome")


def test_completion_has_answer_needs_a_finished_answer_line():
    assert not completion_has_answer("Let me think.")
    assert not completion_has_answer("Answer: B")
    assert not completion_has_answer("Answer:\n")
    assert completion_has_answer("Answer: B\n")
    assert completion_has_answer("Answer:\nB\n")
    assert answer_text("Answer:\nB\nmore") == "B"


def test_helpers():
    assert normalise_text("  The   Moon. ") == "the moon"
    assert parse_number("-$5") == -5.0
    assert parse_number("$-5") == -5.0
    assert parse_number(".5 cups") == 0.5
