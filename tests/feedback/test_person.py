"""A person's hints: held back from the model where they state an option, or (numeric) the number judged right."""

import doctest

import spearfl.feedback.person
from spearfl.data.schema import Example
from spearfl.feedback.person import gave_the_number, states_an_option

PLANETS = Example(uid="p/0", question="Which planet has rings?", options=("Mars", "Saturn", "Venus"), asked=True)
PLANET_TEXTS = Example(
    uid="p/1", question="Which planet has rings?", options=("Mars", "Saturn", "Venus"), label_style="text", asked=True
)
SUM = Example(uid="p/2", question="What is 1,200 + 34?", asked=True)


def test_the_docstring_examples_hold():
    assert doctest.testmod(spearfl.feedback.person).failed == 0


def test_a_hint_that_states_any_option_is_held_back():
    for hint in ("The answer is B.", "(A)", "Look at Saturn", "It is not Venus"):
        assert states_an_option(PLANETS, hint), hint
    assert states_an_option(PLANET_TEXTS, "Answer: mars")
    for hint in ("Think of the gas giants.", "a planet with a bright system around it", "Look again at the question."):
        assert not states_an_option(PLANETS, hint), hint


def test_a_numeric_hint_gave_the_answer_only_when_it_holds_the_number_judged_right():
    assert gave_the_number(SUM, "Add 1200 and 34 to get 1234.", "Answer: 1,234")
    assert not gave_the_number(SUM, "Add the hundreds first.", "Answer: 1234")
    assert not gave_the_number(SUM, "It is 1234.", "I do not know")  # no number judged right
    assert not gave_the_number(PLANETS, "Saturn", "Answer: B")  # multiple choice is filtered before it is shown
