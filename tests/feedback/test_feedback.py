import pytest

from spearfl.config import FeedbackConfig
from spearfl.data.schema import Example
from spearfl.feedback.hints import (
    HINT_STYLES,
    LEAKY_HINT_STYLES,
    solution_steps_hint,
)
from spearfl.feedback.leaks import leak_rate, leak_report, leaks_answer, match_credit
from spearfl.feedback.providers import (
    VERDICT_WRONG,
    Feedback,
    format_reminder,
    make_oracle,
)

GSM_SOLUTION = (
    "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
    "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n"
    "#### 18"
)


def multiple_choice(gold: int = 1, facts: str | None = None) -> Example:
    return Example(
        uid="test/0",
        question="Which gas do plants take in for photosynthesis?",
        options=("oxygen", "carbon dioxide", "nitrogen", "helium"),
        gold=gold,
        facts=facts,
    )


def yes_no(gold: int, facts: str) -> Example:
    return Example(uid="yesno/0", question="Would a pear sink in water?", options=("Yes", "No"), gold=gold,
                   label_style="text", facts=facts)


def free_form(solution: str = GSM_SOLUTION, answer: str = "18") -> Example:
    return Example(uid="gsm/0", question="How much does Janet make?", answer=answer, solution=solution)


def test_oracle_judges_gold_index_zero_with_dataset_scoring():
    example = multiple_choice(gold=0)
    oracle = make_oracle("none", 2, False)
    assert oracle(example, "Reasoning.\nAnswer: A\n") == Feedback(correct=True, hint=None, style="none")
    assert oracle(example, "Answer: B\n").correct is False
    assert oracle(example, "Answer: a\n").correct is False  # the article, not option A


def test_verdict_only_feedback_never_contains_the_answer():
    oracle = make_oracle("none", 2, False)
    for gold in range(4):
        example = multiple_choice(gold=gold, facts="Plants take in carbon dioxide.")
        feedback = oracle(example, "Answer: D\n" if gold != 3 else "Answer: A\n")
        assert feedback.hint is None and feedback.text == VERDICT_WRONG
        assert not leaks_answer(example, feedback.text)
        assert example.options[gold] not in feedback.text


def test_correct_answers_get_no_hint():
    example = free_form()
    assert make_oracle("solution_steps", 2, False)(example, "Answer: 18\n") == Feedback(True, None, "solution_steps")


def test_solution_steps_hint_shows_early_steps_only():
    example = free_form()
    feedback = make_oracle("solution_steps", 2, False)(example, "Answer: 20\n")
    assert feedback.hint == "Janet sells 16 - 3 - 4 = 9 duck eggs a day."
    assert feedback.text == f"{VERDICT_WRONG} Hint: {feedback.hint}"
    assert solution_steps_hint(free_form(solution="It is 18.\n#### 18"), 2) is None


def test_filter_drops_hint_containing_gold_number():
    example = free_form(solution="She earns 9 * 2 = 18 dollars.\nShe keeps them.\n#### 18")
    feedback = make_oracle("solution_steps", 2, False)(example, "Answer: 20\n")
    assert feedback == Feedback(correct=False, hint=None, style="solution_steps", hint_dropped=True)
    assert leaks_answer(free_form(answer="1800"), "That makes 1,800 in all.")
    assert not leaks_answer(free_form(answer="18"), "That makes 18.5 in all.")


def test_filter_drops_hint_quoting_gold_option_text():
    example = multiple_choice(gold=1, facts="Leaves absorb Carbon-Dioxide from the air. They release oxygen.")
    feedback = make_oracle("facts", 2, False)(example, "Answer: A\n")
    assert feedback.hint is None and feedback.hint_dropped
    kept = make_oracle("facts", 2, False)(multiple_choice(gold=1, facts="Leaves breathe in a gas."), "Answer: A\n")
    assert kept.hint == "Leaves breathe in a gas." and not kept.hint_dropped


@pytest.mark.parametrize(
    "hint, leaks",
    [
        ("The answer is B.", True),
        ("answer: (B)", True),
        ("Think about option B", True),
        ("B) is worth a look.", True),
        ("Compare (B) with the rest.", True),
        ("Bees need sunlight too.", False),
        ("the answer is b", False),  # labels are exact capitals
        ("A plant is a living thing.", False),
    ],
)
def test_filter_catches_the_gold_label_stated_as_an_answer(hint, leaks):
    assert leaks_answer(multiple_choice(gold=1), hint) is leaks


def test_yes_no_filter_catches_stated_answers_but_not_prose():
    assert leaks_answer(yes_no(1, ""), "No. Pears float.")
    assert leaks_answer(yes_no(0, ""), "The answer is yes")
    # "no" inside a fact is prose; dropping it for "No" questions only would itself reveal the answer.
    assert not leaks_answer(yes_no(1, ""), "There is no record of a pear sinking.")


def test_leaky_prefix_is_flagged_by_leak_rate_and_filtered_styles_are_near_chance():
    facts = [
        "Leaves use sunlight to make sugar.",
        "Leaves breathe out what animals breathe in, and keep a heavier gas.",
        "Plants release oxygen as waste.",  # names a distractor: kept
        "Plants need carbon dioxide to grow.",  # names the gold option: dropped
    ]
    examples = [multiple_choice(gold=1, facts=fact) for fact in facts]

    leaky = leak_rate(examples, "leaky_option_prefix", 2)
    assert leaky["leaky"] and leaky["num_hints"] == 4 and leaky["num_dropped"] == 0
    assert leaky["matcher_rate"] == 1.0 and leaky["chance_rate"] == 0.25

    filtered = leak_rate(examples, "facts", 2)
    assert filtered["num_hints"] == 4 and filtered["num_dropped"] == 1 and filtered["dropped_fraction"] == 0.25
    assert filtered["num_shown"] == 3
    # Two hints name no option (credit 1/4 each by the tie rule), one names a distractor (credit 0).
    assert filtered["matcher_rate"] == pytest.approx(0.5 / 3)
    assert filtered["matcher_rate"] < leaky["matcher_rate"]


def test_match_credit_shares_ties():
    example = multiple_choice(gold=1)
    assert match_credit(example, "Nothing relevant here.") == 0.25
    assert match_credit(example, "Not oxygen and not nitrogen: carbon dioxide.") == 1.0
    assert match_credit(free_form(), "It costs 18 dollars.") == 1.0


def test_leak_report_covers_every_style_and_dataset():
    datasets = {"mc": [multiple_choice(facts="Leaves use sunlight.")], "gsm": [free_form()]}
    rows = leak_report(datasets, 2)
    assert [(row["dataset"], row["hint_style"]) for row in rows] == [
        (name, style) for name in datasets for style in HINT_STYLES
    ]
    none_row = rows[0]
    assert none_row["num_hints"] == 0 and none_row["matcher_rate"] is None and none_row["dropped_fraction"] is None
    gsm_steps = next(row for row in rows if row["dataset"] == "gsm" and row["hint_style"] == "solution_steps")
    assert gsm_steps["num_shown"] == 1 and gsm_steps["matcher_rate"] == 0.0 and gsm_steps["chance_rate"] is None


def test_leaky_style_is_opt_in_only():
    assert LEAKY_HINT_STYLES == {"leaky_option_prefix"}
    assert FeedbackConfig().hint not in LEAKY_HINT_STYLES


def test_unknown_style_names_the_style_and_the_choices():
    with pytest.raises(ValueError) as error:
        make_oracle("elimination", 2, False)
    message = str(error.value)
    assert "'elimination'" in message
    for style in HINT_STYLES:
        assert style in message


def test_yes_no_leaky_prefix_is_caught_by_filter_and_matcher():
    examples = [yes_no(gold, "Pears float.") for gold in (0, 1)]
    leaky = leak_rate(examples, "leaky_option_prefix", 2)
    assert leaky["flagged_fraction"] == 1.0 and leaky["matcher_rate"] == 1.0 and leaky["chance_rate"] == 0.5
    assert leak_rate(examples, "facts", 2)["matcher_rate"] == 0.5


def test_solution_steps_keep_unpunctuated_lines_apart():
    example = free_form(solution="First add 2 and 3 to get 5\nThen double it to get 10\nFinally add 8,\n#### 18")
    assert solution_steps_hint(example, 2) == "First add 2 and 3 to get 5. Then double it to get 10."


def test_format_reminder_only_for_unparseable_answers_and_names_no_option():
    example = Example(uid="t/1", question="Which is a fruit?", options=("apple", "stone", "chair"), gold=0, label_style="text")
    oracle = make_oracle("none", 2, remind_format=True)
    unparseable = oracle(example, "Answer: I am not sure")
    assert not unparseable.correct and unparseable.hint == format_reminder(example)
    assert not any(option in unparseable.hint for option in example.options)
    assert oracle(example, "Answer: stone").hint is None  # parseable but wrong: verdict only
    assert make_oracle("none", 2, False)(example, "Answer: I am not sure").hint is None  # off by default
