"""A person's feedback on a device: their verdict, and their hint, held back from the model where it gives the
answer away.

Nobody gave the answer, so the filter cannot look for the gold answer as the oracle's does. For a multiple-choice
question it holds back a hint that states any of the options (most of an option's words, or its label named as
the answer, as `spearfl.feedback.leaks.leaks_answer` reads a hint for a gold option): the person may be pointing
at the right one. For a numeric question the answer is known only once the person marks an answer right; a hint
that held that number gave it away (`gave_the_number`), and the revision it led to is not trained on as a win.
Either way the hint stays in the store, for the record.
"""

from __future__ import annotations

import dataclasses

from spearfl.data.schema import Example
from spearfl.data.scoring import parse_answer
from spearfl.feedback.leaks import leaks_answer


def states_an_option(example: Example, hint: str) -> bool:
    """Whether a hint to a multiple-choice question states one of its options: it is then not shown to the model.

    >>> question = Example(uid="p/0", question="Which is a fruit?", options=("apple", "rock"), label_style="text", asked=True)
    >>> states_an_option(question, "It is an apple."), states_an_option(question, "Think of what grows on trees.")
    (True, False)
    """
    if not example.is_multiple_choice:
        return False
    return any(
        leaks_answer(dataclasses.replace(example, gold=index, asked=False), hint) for index in range(len(example.options))
    )


def gave_the_number(example: Example, hint: str, right_answer: str) -> bool:
    """Whether a hint to a numeric question held the number of the answer the person then judged right.

    >>> question = Example(uid="p/1", question="What is 6 x 7?", asked=True)
    >>> gave_the_number(question, "It is 42.", "Answer: 42"), gave_the_number(question, "Multiply.", "Answer: 42")
    (True, False)
    """
    if example.is_multiple_choice:
        return False
    number = parse_answer(example, right_answer)
    return number is not None and leaks_answer(dataclasses.replace(example, answer=number, asked=False), hint)
