r"""Answer parsing and correctness: the one place that decides what a completion answered.

A completion ends with a line `Answer: <label>`. Only the FIRST marker counts, and only the
answer line after it (generation stops at that line's end, see `completion_has_answer`). With
chain-of-thought prompts (`last=True`) the LAST declared answer counts, as the paper scores MATH and
StrategyQA: the reasoning may name answers on its way. A completion generated here still ends at its
first complete answer line, so the two agree on it; they differ on text written elsewhere (a person's).
Multiple choice answers with a label (letter, number or the option text itself, per
`Example.label_style`); free-form answers with a number (or, for a non-numeric gold answer,
the normalised text). A MATH-style example (`answer_format: math`) answers with a LaTeX final answer: its
answer line (the content of a `\boxed{}` on it, if any), or without an answer line the last `\boxed{}` of
the completion, judged against the gold by mathematical equivalence with math-verify (Hugging Face's checker
on sympy): 0.5, 1/2 and \frac{1}{2} are one answer, and so are 2\sqrt{2} and \sqrt{8}.

Deliberately left out: no upper-casing (the article "a" is not option A), no guessing from
prose such as "the answer is B" or "I think B", no search for a later "Answer:" line, no
fractions or units in plain free-form numbers, and no LaTeX normalisation of our own. Math-verify is as
lenient as MATH's graders: it drops units and \text{} words ("5 \text{ cm}" is 5) and reads "10\%" as 10.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import unicodedata

from math_verify import parse as parse_math
from math_verify import verify as verify_math

from spearfl.data.schema import Example

ANSWER_MARKER = "Answer:"

# Characters that wrap an answer ("**B**", "(B)", "'Paris'") and never carry its meaning.
_WRAPPERS = "\"'`*_()[]{}<>\u201c\u201d\u2018\u2019"
# Sentence punctuation that may trail an answer ("Yes.", "B:") but never lead a number ("-3", "$5").
_TRAILING_PUNCTUATION = ".,;:!?"
# After a label token, one of these makes the label explicit: "B)", "B.", "B:", "B -", "**B**", "'B'".
_LABEL_CLOSERS = ")]}>*_\"'`\u201d\u2019.:,;-\u2013\u2014"
# A label token at the very start of the answer, optionally opened by wrappers: "(B", "**B", "[2".
_LABEL_TOKEN = re.compile(r"[\s(\[{<*_\"'`]*(?P<label>[A-Z]|\d+)(?![A-Za-z0-9])")
# A number: optional sign, optional "$", digits with optional thousands commas, optional decimals.
_NUMBER = re.compile(r"(?P<sign>[-\u2212]?)\s?\$?\s?(?P<digits>\d[\d,]*(?:\.\d+)?|\.\d+)")


def normalise_text(text: str) -> str:
    """Casefold, collapse spaces and strip surrounding wrappers and trailing punctuation.

    >>> normalise_text('  "New   York City."  ')
    'new york city'
    >>> normalise_text("**Yes**")
    'yes'
    >>> normalise_text("-3")
    '-3'
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = " ".join(text.split())
    previous = None
    while previous != text:
        previous = text
        text = text.strip(_WRAPPERS + " ").rstrip(_TRAILING_PUNCTUATION + " ")
    return text


def parse_number(text: str) -> float | None:
    """The first number in `text`, ignoring thousands commas and "$"; None when there is none.

    >>> parse_number("$1,234.50 in total")
    1234.5
    >>> parse_number("It is -7.")
    -7.0
    >>> parse_number("no digits") is None
    True
    """
    match = _NUMBER.search(text)
    if match is None:
        return None
    value = float(match.group("digits").replace(",", ""))
    return -value if match.group("sign") else value


def format_number(value: float) -> str:
    """Canonical string of a number, so that 18, 18.0 and "18.00" compare equal.

    >>> format_number(18.0), format_number(-0.5), format_number(1234.5)
    ('18', '-0.5', '1234.5')
    """
    if value == int(value):
        return str(int(value))
    return format(value, ".12g")


def answer_text(completion: str, last: bool = False) -> str | None:
    """The answer line after the first marker (the last one with `last`), stripped; None without a marker
    or text after it.

    Leading blank lines after the marker are skipped ("Answer:\\nB" answers B), then the text
    runs to the end of its line.

    >>> answer_text("Reasoning.\\nAnswer: (B) Paris\\nAnswer: C")
    '(B) Paris'
    >>> answer_text("Reasoning.\\nAnswer: (B) Paris\\nAnswer: C", last=True)
    'C'
    >>> answer_text("no marker") is None
    True
    """
    start = completion.rfind(ANSWER_MARKER) if last else completion.find(ANSWER_MARKER)
    if start < 0:
        return None
    text = completion[start + len(ANSWER_MARKER) :].lstrip()
    text = text.split("\n", 1)[0].strip()
    return text or None


def completion_has_answer(text: str) -> bool:
    """True once the first marker is followed by a non-empty, newline-terminated answer line.

    Generation stops here (or at EOS), so no later invented "Answer:" is ever produced.

    >>> completion_has_answer("Answer: B"), completion_has_answer("Answer: B\\n")
    (False, True)
    >>> completion_has_answer("Answer:\\n")
    False
    """
    start = text.find(ANSWER_MARKER)
    if start < 0:
        return False
    return "\n" in text[start + len(ANSWER_MARKER) :].lstrip()


def parse_answer(example: Example, completion: str, last: bool = False) -> str | None:
    """The label (multiple choice) or canonical answer (free-form) a completion gives, or None.
    last: the last declared answer counts (chain of thought), not the first.

    >>> example = Example(uid="t/0", question="Capital of France?", options=("Rome", "Paris", "Oslo"), gold=1)
    >>> parse_answer(example, "Answer: (B)"), parse_answer(example, "Answer: Paris")
    ('B', 'B')
    >>> parse_answer(example, "Answer: a") is None
    True
    """
    if example.answer_format == "math":
        return final_math_answer(completion, last)
    text = answer_text(completion, last)
    if text is None:
        return None
    if not example.is_multiple_choice:
        return _parse_free_form(example, text)
    if example.label_style == "text":
        return _match_option_text(example, text, allow_prefix=True)
    label = _parse_label(example, text)
    if label is not None:
        return label
    return _match_option_text(example, text, allow_prefix=False)


def gold_answer(example: Example) -> str:
    """The canonical gold answer, in the form `parse_answer` returns (a math answer: its LaTeX as given)."""
    if example.is_multiple_choice:
        return example.gold_label
    if example.answer_format == "math":
        return example.answer.strip()
    value = parse_number(example.answer)
    if value is None:
        return normalise_text(example.answer)
    return format_number(value)


def is_correct(example: Example, completion: str, last: bool = False) -> bool:
    """Whether the completion's first (with `last`, last) declared answer is the gold one."""
    parsed = parse_answer(example, completion, last)
    if parsed is None:
        return False
    if example.answer_format == "math":
        return equivalent_math(gold_answer(example), parsed)
    return parsed == gold_answer(example)


def _parse_label(example: Example, text: str) -> str | None:
    """A label token opening the answer: "B", "(B)", "B.", "**B**", "B. Paris"; None otherwise."""
    match = _LABEL_TOKEN.match(text)
    if match is None or match.group("label") not in example.labels:
        return None
    label = match.group("label")
    rest = text[match.end() :]
    if not rest.strip():
        return label
    if rest[0] in _LABEL_CLOSERS:
        # "2.5" or "1,000" is a number, not label 2 or 1 followed by punctuation.
        is_number_tail = rest[0] in ".," and rest[1:2].isdigit()
        return None if is_number_tail else label
    # A bare "A" followed by words is usually the article ("A cat ..."): accept it only
    # when the words are that option's own text ("B Paris").
    option_text = normalise_text(example.options[example.labels.index(label)])
    return label if _starts_with_phrase(normalise_text(rest), option_text) else None


def as_written(text: str) -> str:
    """Casefold and collapse spaces, drop trailing sentence punctuation; quotes and other wrappers stay.

    The instruction asks for the option "written exactly as it is listed": '"lamp"' or '**lamp**' is a
    format error (the format reminder says so), not the option. A lenient parser here would reward
    the quoted style and train it in.

    >>> as_written("  Kinetic   energy. ")
    'kinetic energy'
    >>> as_written('"lamp"')
    '"lamp"'
    """
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return text.rstrip(_TRAILING_PUNCTUATION + " ")


def _match_option_text(example: Example, text: str, allow_prefix: bool) -> str | None:
    """The label of the one option whose text the answer is (or, with allow_prefix, opens with).

    Verbatim equality is tried before case-insensitive equality, so options that differ only in
    case ("TeSt" / "test") stay distinguishable when answered verbatim.
    """
    verbatim = [index for index, option in enumerate(example.options) if option.strip() == text]
    if len(verbatim) == 1:
        return example.labels[verbatim[0]]
    answer = as_written(text)
    exact = [index for index, option in enumerate(example.options) if as_written(option) == answer]
    if len(exact) == 1:
        return example.labels[exact[0]]
    if verbatim or exact or not allow_prefix:
        return None
    prefixed = [
        index
        for index, option in enumerate(example.options)
        if _opens_with_then_punctuation(answer, as_written(option))
    ]
    return example.labels[prefixed[0]] if len(prefixed) == 1 else None


def _parse_free_form(example: Example, text: str) -> str | None:
    """The first number of the answer line (or its normalised text, for a non-numeric gold; a person's question
    with no gold is numeric)."""
    if example.answer is not None and parse_number(example.answer) is None:
        return normalise_text(text) or None
    value = parse_number(text)
    return None if value is None else format_number(value)


def _starts_with_phrase(text: str, phrase: str) -> bool:
    """`text` opens with `phrase` as whole words."""
    if not phrase or not text.startswith(phrase):
        return False
    following = text[len(phrase) : len(phrase) + 1]
    return not following.isalnum()


def _opens_with_then_punctuation(text: str, phrase: str) -> bool:
    """`text` opens with `phrase` and the next non-space character is punctuation: "yes, because"."""
    if not phrase or not text.startswith(phrase):
        return False
    following = text[len(phrase) :].lstrip()
    return bool(following) and not following[0].isalnum()


# ---------------------------------------------------------------- MATH-style final answers

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# An answer longer than this is judged wrong unparsed: sympy can take unbounded time on a long expression, and
# outside the main thread math-verify has no timeout (below). MATH's longest gold answer has 81 characters.
MAX_MATH_ANSWER_CHARS = 400
# math-verify's timeouts use signal.alarm, which works only in the main thread; the device service judges from
# worker threads. There the call runs without a timeout, bounded by MAX_MATH_ANSWER_CHARS instead.
MATH_TIMEOUT_SECONDS = 5
logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every call made without a timeout


def boxed_contents(text: str) -> list[str]:
    r"""The contents of every `\boxed{...}` (or `\fbox{...}`) in the text, braces balanced, in order.

    >>> boxed_contents(r"so $\boxed{\frac{1}{2}}$, not \boxed{3}")
    ['\\frac{1}{2}', '3']
    """
    contents = []
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for position in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[position], 0)
            if depth == 0:
                contents.append(text[start:position].strip())
                break
    return contents


def final_math_answer(completion: str, last: bool = False) -> str | None:
    r"""A MATH-style completion's final answer: its answer line (the last boxed content on it, if any), else the
    last `\boxed{}` of the completion; None when it has neither.

    >>> final_math_answer("So x = 2.\nAnswer: $\\boxed{2}$\n"), final_math_answer(r"Thus \boxed{7}. Done")
    ('2', '7')
    """
    line = answer_text(completion, last)
    if line is not None:
        boxed = boxed_contents(line)
        return boxed[-1] if boxed else line
    boxed = boxed_contents(completion)
    return boxed[-1] if boxed else None


def equivalent_math(gold: str, answer: str) -> bool:
    r"""Whether two LaTeX final answers are mathematically equal (math-verify), e.g. \frac{1}{2} and 0.5."""
    if len(answer) > MAX_MATH_ANSWER_CHARS:
        return False
    parsed_gold, parsed_answer = parsed_math(gold), parsed_math(answer)
    if not parsed_gold or not parsed_answer:
        return False
    return verify_math(list(parsed_gold), list(parsed_answer), timeout_seconds=_math_timeout())


def parsed_math(text: str) -> tuple:
    """math-verify's reading of a final answer (sympy expression, then the string); () when it finds none.
    Cached: the leak filter asks about one gold many times."""
    return _parsed_math(text.strip(), _math_timeout())


@functools.lru_cache(maxsize=65536)
def _parsed_math(text: str, timeout: int | None) -> tuple:
    return tuple(parse_math(_as_latex(text), parsing_timeout=timeout))


def _math_timeout() -> int | None:
    return MATH_TIMEOUT_SECONDS if threading.current_thread() is threading.main_thread() else None


def _as_latex(text: str) -> str:
    """A final answer in maths delimiters, as math-verify extracts it (text already delimited stays as it is)."""
    text = text.strip()
    return text if text.startswith(("$", "\\(", "\\[")) else f"${text}$"
