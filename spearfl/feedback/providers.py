"""Feedback providers: a verdict on a completion and, when it is wrong, a hint that never states the answer.

A provider is a small callable `(example, completion_text) -> Feedback`. The oracle simulates a user
who knows the answer but never says it: its verdict reuses `spearfl.data.scoring.is_correct`, and its
hint comes from a hint style (`spearfl.feedback.hints`). Every hint of a non-leaky style passes
`spearfl.feedback.leaks.leaks_answer` first; one that leaks is dropped (the user gives the verdict only)
and the drop is recorded on the Feedback so that rounds can count it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from spearfl.data.schema import Example
from spearfl.data.scoring import is_correct, parse_answer
from spearfl.feedback.hints import (
    LEAKY_HINT_STYLES,
    hint_function_for,
)
from spearfl.feedback.leaks import leaks_answer

VERDICT_CORRECT = "Your previous answer is correct."
VERDICT_WRONG = "Your previous answer is not correct."


@dataclass(frozen=True)
class Feedback:
    """A verdict, an optional hint, the hint style that produced it, and whether the leak filter dropped a hint."""

    correct: bool
    hint: str | None
    style: str
    hint_dropped: bool = False

    @property
    def text(self) -> str:
        """The feedback as the revision prompt shows it: the verdict, then the hint if any."""
        verdict = VERDICT_CORRECT if self.correct else VERDICT_WRONG
        return verdict if self.hint is None else f"{verdict} Hint: {self.hint}"


class FeedbackProvider(Protocol):
    """Judges one completion of one example."""

    def __call__(self, example: Example, completion_text: str) -> Feedback: ...


def format_reminder(example: Example) -> str:
    """What a user says to an answer that names no option (or no number): the format, nothing of the content."""
    if example.is_multiple_choice:
        return "Your answer does not name one of the listed options; reply with one of them, written as listed."
    if example.answer_format == "math":
        return 'Your answer does not end with a line "Answer: " and the final answer.'
    return "Your answer does not end with a number."


def make_oracle(
    hint_style: str, max_hint_sentences: int, remind_format: bool, last_answer: bool = False
) -> FeedbackProvider:
    """A simulated user who knows the gold answer, judges with the dataset's scoring and never states it.

    remind_format: an answer that cannot be parsed also gets `format_reminder`, which names no option.
    last_answer: the last declared answer is judged (chain-of-thought prompts), not the first.
    """
    return make_provider(
        lambda example, text: is_correct(example, text, last_answer), hint_style, max_hint_sentences, remind_format, last_answer
    )


def make_provider(
    verdict: Callable[[Example, str], bool], hint_style: str, max_hint_sentences: int, remind_format: bool,
    last_answer: bool = False,
) -> FeedbackProvider:
    """A user whose verdict comes from `verdict(example, completion_text)` (the dataset's scoring, a verifier, a
    judge model); hints, the leak filter and the format reminder as the oracle gives them."""
    hint_function = hint_function_for(hint_style)
    is_filtered = hint_style not in LEAKY_HINT_STYLES

    def oracle(example: Example, completion_text: str) -> Feedback:
        if verdict(example, completion_text):
            return Feedback(correct=True, hint=None, style=hint_style)
        hint = hint_function(example, max_hint_sentences)
        dropped = hint is not None and is_filtered and leaks_answer(example, hint)
        if dropped:
            hint = None
        if remind_format and parse_answer(example, completion_text, last_answer) is None:
            hint = format_reminder(example) if hint is None else f"{format_reminder(example)} {hint}"
        return Feedback(correct=False, hint=hint, style=hint_style, hint_dropped=dropped)

    return oracle
