r"""Programmatic verifiers: verdicts from a rule instead of the dataset's own scoring, usable wherever the oracle is.

A verifier is `(example, answer_text) -> bool`, answer_text being the reply as the person sees it (the answer
line included). `spearfl.feedback.providers.make_provider` wraps one with the configured hint style, leak filter
and format reminder, exactly as the oracle wraps the dataset's scoring:
- numeric: the answer line's number equals the gold number within a relative tolerance;
- exact: the answer line equals the gold answer (the gold option's text, or the free-form answer), ignoring
  case, spacing and punctuation at the ends;
- math: the final answer (the answer line, or the last \\boxed{}) is mathematically equivalent to the gold answer,
  both read as LaTeX by math-verify, as MATH is scored (`spearfl.data.scoring.equivalent_math`);
- regex: a pattern, in which `{answer}` stands for the gold answer (escaped), matches the answer line;
- python: a function the user names as `module:function`, called with (example, answer_text).
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable

from spearfl.data.schema import Example
from spearfl.data.scoring import (
    answer_text,
    equivalent_math,
    final_math_answer,
    normalise_text,
    parse_number,
)

Verifier = Callable[[Example, str], bool]


def gold_text(example: Example) -> str:
    """The gold answer as text: the gold option's text, or the free-form answer."""
    return example.options[example.gold] if example.is_multiple_choice else example.answer


def numeric(tolerance: float = 1e-6) -> Verifier:
    """Right when the answer line's first number is the gold number, within `tolerance` relative to it.

    >>> numeric()(Example(uid="v/0", question="6 x 7?", answer="42"), "Answer: 42.0")
    True
    """

    def verify(example: Example, text: str) -> bool:
        line, gold = answer_text(text), parse_number(gold_text(example))
        value = None if line is None else parse_number(line)
        return value is not None and gold is not None and math.isclose(value, gold, rel_tol=tolerance, abs_tol=tolerance)

    return verify


def exact(example: Example, text: str) -> bool:
    """Right when the answer line is the gold answer, up to case, spacing and end punctuation.

    >>> exact(Example(uid="v/1", question="Capital of France?", answer="Paris"), "Answer: paris.")
    True
    """
    line = answer_text(text)
    return line is not None and normalise_text(line) == normalise_text(gold_text(example))


def math_equivalent(example: Example, text: str) -> bool:
    r"""Right when the final answer is the gold answer up to mathematical equivalence.

    >>> math_equivalent(Example(uid="v/3", question="Half of one?", answer=r"\frac{1}{2}"), "It is $0.5$.\nAnswer: 0.5")
    True
    """
    answer = final_math_answer(text)
    return answer is not None and equivalent_math(gold_text(example), answer)


def regex(pattern: str) -> Verifier:
    """Right when `pattern` ({answer}: the gold answer, escaped) matches the answer line (re.search).

    >>> regex(r"^{answer}\\b")(Example(uid="v/2", question="Largest planet?", answer="Jupiter"), "Answer: Jupiter, by far")
    True
    """

    re.compile(pattern.replace("{answer}", "gold"))  # a malformed pattern fails here, before any round

    def verify(example: Example, text: str) -> bool:
        line = answer_text(text)
        compiled = re.compile(pattern.replace("{answer}", re.escape(gold_text(example))), re.IGNORECASE)
        return line is not None and compiled.search(line) is not None

    return verify


def python_function(name: str) -> Verifier:
    """The function `module:function`, imported; ValueError naming the problem if it cannot be found."""
    module_name, _, function_name = name.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"{name!r}: name the function as module:function")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{name!r}: {error}") from None
    if not callable(function):
        raise TypeError(f"{name!r} is not a function")
    return lambda example, text: bool(function(example, text))
