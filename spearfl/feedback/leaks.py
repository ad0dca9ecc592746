"""The leak filter, and how much the hints that pass it still reveal.

`leaks_answer` says whether a hint states the answer: the gold label used as an answer, most of the gold
option's words, or the gold number. `leak_rate` measures what the hints that are shown still reveal: how
often a plain word-overlap matcher picks the gold option from the hint alone, next to chance.
"""

from __future__ import annotations

import re

import sympy

from spearfl.data.schema import Example
from spearfl.data.scoring import (
    equivalent_math,
    format_number,
    normalise_text,
    parsed_math,
)
from spearfl.feedback.hints import (
    HINT_STYLES,
    LEAKY_HINT_STYLES,
    hint_function_for,
)

# Share of the gold option's content words that a hint may repeat before it counts as quoting the option.
OPTION_OVERLAP_LEAK_THRESHOLD = 0.75

# Function words carry no evidence for an option. "yes" and "no" are here too: as option texts they are
# answers, but inside a fact ("no longer", "there is no record") they are prose, and treating them as
# quotes would drop the facts of "No" questions only, which itself tells the model the answer.
STOPWORDS = frozenset(
    """
    a an the and or but if then than so as of to in on at by for from with without into onto about over
    under between through during before after above below up down out off again once here there when
    where why how all any both each few more most other some such only own same too very can will just
    should would could may might must shall do does did doing done is are was were be been being have
    has had having i me my we our you your he him his she her it its they them their what which who whom
    this that these those am not no nor yes s t also because while until against
    """.split()
)

# Maths in a hint: $$...$$ before $...$, then \[...\] and \(...\).
_MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|\$(.+?)\$|\\\[(.+?)\\\]|\\\((.+?)\\\)", re.DOTALL)
# A word or a number (thousands commas and decimals kept together, sign dropped: see `_tokens`).
_TOKEN = re.compile(r"\d[\d,]*(?:\.\d+)?|[^\W\d_]+")
# Words that introduce a label as the answer: "answer is B", "option: B", "choice B".
_ANSWER_KEYWORD = r"(?i:answer|option|choice|letter)\s*(?:(?i:is|was|would be|should be)\s*)?[:=-]?\s*"


def leaks_answer(example: Example, hint: str) -> bool:
    """Whether a hint states the answer: the gold label as an answer, the gold option's text, or the gold number.

    >>> example = Example(uid="t/0", question="2 + 2?", answer="4")
    >>> leaks_answer(example, "Add two and two: 2 + 2 = 4."), leaks_answer(example, "Count on your fingers.")
    (True, False)
    """
    if not example.is_multiple_choice:
        if example.answer_format == "math" and _states_math_answer(example.answer, hint):
            return True
        return _mentions_free_form_answer(example.answer, hint)
    gold_option = example.options[example.gold]
    return _states_label(example.gold_label, example.label_style, hint) or _quotes_option(gold_option, hint)


def _states_label(label: str, label_style: str, hint: str) -> bool:
    """The label used as an answer: "answer is B", "option B", (B), a quoted B, "B)", or "B." opening a sentence."""
    label_pattern = re.escape(label)
    patterns = [
        rf"{_ANSWER_KEYWORD}[(\[\"'*]*{label_pattern}(?!\w)",
        rf"[(\[]\s*{label_pattern}\s*[)\]]",
        rf"[\"'\u201c\u2018]{label_pattern}[\"'\u201d\u2019]",
        rf"(?<![\w(]){label_pattern}\)",
        rf"(?:^|[.!?]\s+)[\"'*]*{label_pattern}[\"'*]*\s*[.,:;!]",
    ]
    # Text labels ("Yes") are words; letter labels are exact capitals ("a" is the article, not A).
    flags = re.IGNORECASE if label_style == "text" else 0
    return any(re.search(pattern, hint, flags) for pattern in patterns)


def _quotes_option(option: str, hint: str) -> bool:
    """Most of the option's content words (or all of its numbers' values) appear in the hint."""
    option_words = content_words(option)
    if not option_words:
        return False
    shared = option_words & content_words(hint)
    return len(shared) / len(option_words) >= OPTION_OVERLAP_LEAK_THRESHOLD


def _mentions_free_form_answer(answer: str, hint: str) -> bool:
    """A number in the hint equals the gold number; a non-numeric gold appears as whole words."""
    answer_tokens = _tokens(answer)
    if not answer_tokens:
        return False
    hint_tokens = _tokens(hint)
    if len(answer_tokens) == 1:
        return answer_tokens[0] in hint_tokens
    return _contains_sequence(hint_tokens, answer_tokens)


def math_spans(text: str, whole_equations: bool = False) -> list[str]:
    r"""The maths of a text: each $...$, $$...$$, \(...\) and \[...\] span, or of a span with "=" the side after each
    (and the whole equation too with `whole_equations`, for a gold that is itself one, "y = 2x + 3").

    >>> math_spans(r"So $x = \frac{1}{2}$ and \[y=3\], $z^2$.")
    ['\\frac{1}{2}', '3', 'z^2']
    """
    candidates = []
    for match in _MATH_SPAN.finditer(text):
        span = next(group for group in match.groups() if group is not None).strip()
        sides = [side.strip() for side in re.split(r"(?<![<>\\!])=", span)[1:]]
        # an equation is read as its right-hand side, so its sides stand for it
        candidates += ([span] if whole_equations and sides else []) + ([side for side in sides if side] or [span])
    return candidates


def _states_math_answer(gold: str, hint: str) -> bool:
    """A maths span of the hint, or the right-hand side of an "=" in one, is equivalent to the gold (math-verify).

    A candidate that is an expression in unknowns ("x^2+x-6") cannot equal a gold that is a number, so it is passed
    over without the equivalence check (most spans of a worked solution are such; an equation is not passed over:
    math-verify reads "x = 3" as its right-hand side).
    """
    gold_number = _is_number(parsed_math(gold))
    candidates = math_spans(hint, whole_equations="=" in gold)
    return any(equivalent_math(gold, candidate) for candidate in candidates if not (gold_number and _has_unknowns(parsed_math(candidate))))


def _is_number(parsed: tuple) -> bool:
    return bool(parsed) and isinstance(parsed[0], sympy.Expr) and parsed[0].is_number


def _has_unknowns(parsed: tuple) -> bool:
    return bool(parsed) and isinstance(parsed[0], sympy.Expr) and bool(parsed[0].free_symbols)


def content_words(text: str) -> set[str]:
    """Distinct normalised words and canonical numbers of a text, stopwords removed."""
    return {token for token in _tokens(text) if token not in STOPWORDS}


def _tokens(text: str) -> list[str]:
    """Casefolded words and numbers; numbers canonical ("1,200.0" -> "1200") and unsigned ("-3" -> "3").

    The sign is dropped on purpose: "16-3" holds 3, and a hint showing 3 when the answer is -3 still leaks.
    """
    tokens = []
    for token in _TOKEN.findall(normalise_text(text)):
        if token[0].isdigit():
            token = format_number(float(token.replace(",", "")))
        tokens.append(token)
    return tokens


def _contains_sequence(tokens: list[str], sequence: list[str]) -> bool:
    """`sequence` occurs contiguously in `tokens`."""
    width = len(sequence)
    return any(tokens[start : start + width] == sequence for start in range(len(tokens) - width + 1))



def match_credit(example: Example, hint: str) -> float:
    """Credit a hint-only matcher earns: it picks the option sharing most content words with the hint.

    Ties share the pick: credit 1/#tied when the gold option is among them, so a hint that says nothing
    about any option earns exactly chance (1/#options). Free-form: 1 when the gold number is in the hint.
    """
    if not example.is_multiple_choice:
        return float(leaks_answer(example, hint))
    overlaps = option_overlaps(example, hint)
    return _tied_credit(overlaps, example.gold, max(overlaps))


def elimination_credit(example: Example, hint: str) -> float:
    """Credit of the reverse matcher: it picks among the options sharing the FEWEST words with the hint.

    A filter that drops hints naming the gold option leaves hints that name distractors; this measures
    whether that makes the shown hints an elimination cue. Free-form: 0 (nothing to eliminate).
    """
    if not example.is_multiple_choice:
        return 0.0
    overlaps = option_overlaps(example, hint)
    return _tied_credit(overlaps, example.gold, min(overlaps))


def option_overlaps(example: Example, hint: str) -> list[int]:
    """Number of words each option shares with the hint: its content words, or all its words if it has none.

    The fallback lets the matcher see options made of stopwords only ("Yes", "No", "None of these").
    """
    hint_words = set(_tokens(hint))
    return [len((content_words(option) or set(_tokens(option))) & hint_words) for option in example.options]


def _tied_credit(scores: list[int], gold: int, chosen_score: int) -> float:
    """1/#options scoring `chosen_score` if the gold option is one of them, else 0."""
    tied = [index for index, score in enumerate(scores) if score == chosen_score]
    return 1.0 / len(tied) if gold in tied else 0.0


def leak_rate(examples: list[Example], hint_style: str, max_hint_sentences: int) -> dict:
    """How much one hint style reveals on a dataset, as the oracle would show it to a wrong answer.

    Keys: num_examples, num_hints (produced), num_flagged and flagged_fraction (what the filter flags),
    num_dropped and dropped_fraction (what the oracle drops: flagged hints of non-leaky styles), num_shown,
    matcher_rate (mean `match_credit` over shown hints), elimination_rate, chance_rate (mean 1/#options
    over the same examples; None for free-form). Rates are None when no hint is shown.
    """
    hint_function = hint_function_for(hint_style)
    is_filtered = hint_style not in LEAKY_HINT_STYLES
    hinted = [(example, hint) for example in examples if (hint := hint_function(example, max_hint_sentences))]
    flags = [leaks_answer(example, hint) for example, hint in hinted]
    shown = [pair for pair, is_flagged in zip(hinted, flags) if not (is_flagged and is_filtered)]
    num_dropped = len(hinted) - len(shown)
    return {
        "hint_style": hint_style,
        "leaky": not is_filtered,
        "num_examples": len(examples),
        "num_hints": len(hinted),
        "num_flagged": sum(flags),
        "flagged_fraction": _fraction(sum(flags), len(hinted)),
        "num_dropped": num_dropped,
        "dropped_fraction": _fraction(num_dropped, len(hinted)),
        "num_shown": len(shown),
        "matcher_rate": _mean([match_credit(example, hint) for example, hint in shown]),
        "elimination_rate": _mean([elimination_credit(example, hint) for example, hint in shown]),
        "chance_rate": _chance_rate([example for example, _ in shown]),
    }


def leak_report(
    datasets: dict[str, list[Example]], max_hint_sentences: int
) -> list[dict]:
    """`leak_rate` rows for every hint style on every dataset; a style without hint material reports 0 hints."""
    rows = []
    for dataset_name, examples in datasets.items():
        for hint_style in HINT_STYLES:
            row = leak_rate(examples, hint_style, max_hint_sentences)
            rows.append({"dataset": dataset_name, **row})
    return rows


def _chance_rate(examples: list[Example]) -> float | None:
    """Mean 1/#options: what guessing earns. None without multiple-choice examples."""
    return _mean([1.0 / len(example.options) for example in examples if example.is_multiple_choice])


def _fraction(count: int, total: int) -> float | None:
    return count / total if total else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
