"""Hint styles: (example, max_sentences) -> hint text or None (verdict only). A hint never states the answer.

Hints come from the example's own hint material (StrategyQA facts, worked solutions). The oracle passes every
hint of a non-leaky style through the leak filter (`spearfl.feedback.leaks`) before a model sees it.

Deliberately left out: an "elimination" hint ("do not repeat your previous letter"), which lets a model
answer by crossing options off, and any hint naming which option the model picked. The reference's
"first words of the correct option" hint exists only as the opt-in `leaky_option_prefix`, so that its
leak can be measured; no default uses it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from spearfl.data.schema import Example

# Opening words of the correct option the leaky hint quotes (the reference quoted "the first words";
# the count is ours).
LEAKY_PREFIX_WORDS = 3
# A sentence ends at ".", "!" or "?" before white space, also where the stop closes a maths span ("than $x.$ Then").
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?]\$)\s+")
# gsm8k calculator annotations "<<16-3-4=9>>" repeat results that the prose already shows.
_CALCULATOR_ANNOTATION = re.compile(r"<<[^>]*>>")
# Sentences of a worked solution that carry the final answer itself: GSM8K's "#### 13" line, MATH's \boxed{}.
_FINAL_ANSWER_SENTENCE = re.compile(r"^\s*####|\\boxed|\\fbox|answer is", re.IGNORECASE)


def no_hint(example: Example, max_sentences: int) -> str | None:
    """Verdict only."""
    return None


def facts_hint(example: Example, max_sentences: int) -> str | None:
    """The first sentences of the example's supporting facts (StrategyQA); None without facts."""
    if not example.facts:
        return None
    sentences = split_sentences(example.facts)
    return " ".join(sentences[:max_sentences]) or None


def solution_steps_hint(example: Example, max_sentences: int) -> str | None:
    """The first steps of a worked solution, never its last step or a line that states the answer."""
    if not example.solution:
        return None
    steps = solution_steps(example.solution)
    # The last step computes the answer itself, so at most all steps but the last are shown.
    return " ".join(steps[: min(max_sentences, len(steps) - 1)]) or None


def leaky_option_prefix_hint(example: Example, max_sentences: int) -> str | None:
    """LEAKY, opt-in only: the opening words of the correct option, as the reference's hint gave them.

    It leaks because a model (or a string matcher) can pick the option that starts with those words
    without solving anything; `leak_rate` shows it. It is never filtered, so the leak stays measurable.
    """
    if not example.is_multiple_choice:
        return None
    opening_words = example.options[example.gold].split()[:LEAKY_PREFIX_WORDS]
    return f'The correct option starts with "{" ".join(opening_words)}".'


HintFunction = Callable[[Example, int], str | None]
HINT_STYLES: dict[str, HintFunction] = {
    "none": no_hint,
    "facts": facts_hint,
    "solution_steps": solution_steps_hint,
    "leaky_option_prefix": leaky_option_prefix_hint,
}
LEAKY_HINT_STYLES = frozenset({"leaky_option_prefix"})


def split_sentences(text: str) -> list[str]:
    """Sentences of a text, split after ".", "!" or "?" followed by whitespace; empty ones removed."""
    return [sentence.strip() for sentence in _SENTENCE_END.split(text.strip()) if sentence.strip()]


def solution_steps(solution: str) -> list[str]:
    """Steps of a worked solution: its sentences, line by line, without calculator annotations or the sentences
    that state the final answer (a MATH solution is often one paragraph whose last sentence holds the \\boxed{}).

    A step without closing punctuation gets a full stop, so that steps joined into one hint stay apart.
    """
    steps = []
    for line in _CALCULATOR_ANNOTATION.sub("", solution).splitlines():
        steps.extend(sentence for sentence in split_sentences(line) if not _FINAL_ANSWER_SENTENCE.search(sentence))
    steps = [step.rstrip(",;: ") for step in steps]
    return [step if step[-1] in ".!?" else step + "." for step in steps if step]



def hint_function_for(hint_style: str) -> HintFunction:
    """The hint function of a style; a ValueError naming the style and the valid ones otherwise."""
    if hint_style not in HINT_STYLES:
        labelled = [f"{style} (leaky, opt-in)" if style in LEAKY_HINT_STYLES else style for style in HINT_STYLES]
        choices = ", ".join(labelled)
        raise ValueError(f"unknown hint style {hint_style!r}; choose one of: {choices}")
    return HINT_STYLES[hint_style]
