"""The one record every dataset is turned into: a task, its options or free-form answer, and hint material."""

from __future__ import annotations

import string
from dataclasses import dataclass

LABEL_STYLES = ("letters", "numbers", "text")
# How a free-form answer is judged: "plain", a number (or, for a non-numeric gold, the normalised text); "math",
# mathematical equivalence of LaTeX final answers (spearfl.data.scoring, with math-verify).
ANSWER_FORMATS = ("plain", "math")


@dataclass(frozen=True)
class Example:
    """One task. `gold` indexes `options`; index 0 is a valid answer, so test it with `is None`."""

    uid: str
    question: str
    options: tuple[str, ...] = ()
    gold: int | None = None
    answer: str | None = None
    label_style: str = "letters"
    passage: str | None = None
    facts: str | None = None
    solution: str | None = None
    # The task as a ranked-classification (cloze) context in its dataset's own format (OLMES), which each
    # option's text continues; None: "Question: <question>\nAnswer:" (`spearfl.data.prompts.cloze_context`).
    cloze_context: str | None = None
    answer_format: str = "plain"  # free-form only: see ANSWER_FORMATS
    # The example's category in its dataset (MATH's subject), the class label-skew partitions by when set.
    category: str | None = None
    # A person's question on a device: nobody gave its answer, the person judges the model's (no gold, no answer).
    asked: bool = False

    def __post_init__(self) -> None:
        if self.label_style not in LABEL_STYLES:
            raise ValueError(f"{self.uid}: label_style must be one of {LABEL_STYLES}, got {self.label_style!r}")
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"{self.uid}: answer_format must be one of {ANSWER_FORMATS}, got {self.answer_format!r}")
        if self.answer_format != "plain" and self.options:
            raise ValueError(f"{self.uid}: answer_format {self.answer_format!r} is for free-form examples, not options")
        if self.asked:
            if self.gold is not None or self.answer is not None:
                raise ValueError(f"{self.uid}: a person's question carries no gold answer")
            if self.label_style == "letters" and len(self.options) > 26:
                raise ValueError(f"{self.uid}: {len(self.options)} options exceed the 26 letter labels")
        elif self.options:
            if self.gold is None or not 0 <= self.gold < len(self.options):
                raise ValueError(f"{self.uid}: gold index {self.gold!r} outside 0..{len(self.options) - 1}")
            if self.label_style == "letters" and len(self.options) > 26:
                raise ValueError(f"{self.uid}: {len(self.options)} options exceed the 26 letter labels")
        elif self.answer is None:
            raise ValueError(f"{self.uid}: a free-form example needs an answer")

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.options)

    @property
    def labels(self) -> tuple[str, ...]:
        """Labels the model answers with: A, B, ... or 1, 2, ... or the option texts themselves."""
        if self.label_style == "letters":
            return tuple(string.ascii_uppercase[: len(self.options)])
        if self.label_style == "numbers":
            return tuple(str(index + 1) for index in range(len(self.options)))
        return self.options

    @property
    def gold_label(self) -> str:
        """The correct label for multiple choice, the gold answer for free-form."""
        if self.is_multiple_choice:
            return self.labels[self.gold]
        return self.answer

    @property
    def class_label(self) -> str:
        """The class used for label-skew partitioning: the category when set, else the gold option's position, or
        the answer's last character.

        Position rather than text, so that tasks whose options change from question to question still
        have a few classes to skew over. A LaTeX answer's last character ("}" of "\\frac{1}{2}") says nothing, so
        MATH skews over its seven subjects.
        """
        if self.category is not None:
            return self.category
        if self.is_multiple_choice:
            return str(self.gold)
        return self.answer.strip()[-1:] or "?"
