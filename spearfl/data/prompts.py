"""Prompts: the task as the model sees it, the revision turn, and the one encoder used everywhere.

Generation, training and evaluation all encode prompts through `encode_messages`, so the token ids
a completion is trained under are the ids it was sampled under (the reference tokenised prompts with
BOS for generation and without for training). The gold answer, facts and solutions never appear in the
task or revision prompts: the task shows only the question, its passage and its options. Only
`privileged`, the prompt of the OPSD teacher (a baseline that needs ground truth), shows them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spearfl.data.schema import Example
from spearfl.data.scoring import ANSWER_MARKER

INSTRUCTIONS = {
    "letters": 'Reply with "Answer: " followed by the letter of the correct option.',
    "numbers": 'Reply with "Answer: " followed by the number of the correct option.',
    "text": 'Reply with "Answer: " followed by the correct option, written exactly as it is listed.',
}
FREE_FORM_INSTRUCTION = 'Solve the problem. End with a line "Answer: " followed by the final number only.'
# Chain of thought (prompt.reasoning): the same answer line, after the reasoning.
REASONING_INSTRUCTIONS = {
    "letters": 'Think step by step, then end with a line "Answer: " followed by the letter of the correct option.',
    "numbers": 'Think step by step, then end with a line "Answer: " followed by the number of the correct option.',
    "text": 'Think step by step, then end with a line "Answer: " followed by the correct option, written exactly as it is listed.',
}
REASONING_FREE_FORM_INSTRUCTION = 'Solve the problem step by step. End with a line "Answer: " followed by the final number only.'
MATH_INSTRUCTION = 'Solve the problem. End with a line "Answer: " followed by the final answer only, in LaTeX.'
REASONING_MATH_INSTRUCTION = (
    'Solve the problem step by step. End with a line "Answer: " followed by the final answer only, in LaTeX.'
)
REVISION_INSTRUCTION = "Answer the question again from scratch, in the same format."


def instruction(example: Example, reasoning: bool = False) -> str:
    """The answer-format instruction of a task: the answer line alone, or after step-by-step reasoning."""
    if example.is_multiple_choice:
        return (REASONING_INSTRUCTIONS if reasoning else INSTRUCTIONS)[example.label_style]
    if example.answer_format == "math":
        return REASONING_MATH_INSTRUCTION if reasoning else MATH_INSTRUCTION
    return REASONING_FREE_FORM_INSTRUCTION if reasoning else FREE_FORM_INSTRUCTION


def render_task(example: Example, reasoning: bool = False) -> str:
    """The user turn for one example: passage, question, options and the answer-format instruction."""
    parts = []
    if example.passage:
        parts.append(example.passage.strip())
    parts.append(example.question.strip())
    if example.is_multiple_choice:
        if example.label_style == "text":
            parts.append("\n".join(f"- {option}" for option in example.options))
        else:
            parts.append("\n".join(f"{label}. {option}" for label, option in zip(example.labels, example.options)))
    parts.append(instruction(example, reasoning))
    return "\n\n".join(parts)


def task_messages(example: Example, reasoning: bool = False) -> list[dict[str, str]]:
    """Chat messages for a first attempt."""
    return [{"role": "user", "content": render_task(example, reasoning)}]


def revision_messages(
    example: Example, previous_answer: str, feedback_text: str, reasoning: bool = False
) -> list[dict[str, str]]:
    """Chat messages for a revision: the task, the previous answer, the feedback and the instruction."""
    return [
        {"role": "user", "content": render_task(example, reasoning)},
        {"role": "assistant", "content": previous_answer.strip()},
        {"role": "user", "content": f"{feedback_text.strip()} {REVISION_INSTRUCTION}"},
    ]


def plain_transcript(messages: list[dict[str, str]]) -> str:
    """A plain-text dialogue for base models that ship no chat template."""
    turns = [f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages]
    return "\n\n".join(turns) + "\n\nAssistant:"


CHAT_TEMPLATE_MODES = ("auto", "always", "never")


class ChatTemplateMissing(ValueError):
    """prompt.chat_template is "always" but the tokenizer has none."""


def uses_chat_template(tokenizer, mode: str = "auto") -> bool:
    """Whether prompts go through the tokenizer's chat template: "auto" when it has one, "always", or "never"
    (plain text, for a base model whose tokenizer ships a template it was never trained on)."""
    if mode not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"chat template mode must be one of {CHAT_TEMPLATE_MODES}, got {mode!r}")
    if mode == "always" and tokenizer.chat_template is None:
        raise ChatTemplateMissing("prompt.chat_template is 'always' but this tokenizer has no chat template; use auto or never")
    return mode != "never" and tokenizer.chat_template is not None


def encode_messages(tokenizer, messages: list[dict[str, str]], chat_template: str = "auto") -> list[int]:
    """Token ids of a chat prompt ending where the assistant's reply begins (plain text without a chat template)."""
    if not uses_chat_template(tokenizer, chat_template):
        return tokenizer.encode(plain_transcript(messages))
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return list(encoded)


@dataclass(frozen=True)
class PromptFormat:
    """How prompts become token ids, shared by generation, training, feedback and evaluation.

    With `answer_prefix`, every assistant turn starts with the answer marker already written, so the
    model only completes the answer line: small models that never produce the marker on their own
    (SmolLM2-135M answers "Answer:"-format instructions in free prose) still give scorable answers.
    The marker then lives in the prompt; judging and parsing see prefix + completion.
    With `reasoning`, the instruction asks for step-by-step reasoning before the answer line, and the last
    declared answer counts (`last_answer`). `chat_template`: see `uses_chat_template`.
    """

    tokenizer: Any
    answer_prefix: bool
    reasoning: bool = False
    chat_template: str = "auto"

    @property
    def last_answer(self) -> bool:
        """Whether the last declared answer counts (chain of thought) rather than the first."""
        return self.reasoning

    @property
    def prefix(self) -> str:
        return ANSWER_MARKER if self.answer_prefix else ""

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        ids = encode_messages(self.tokenizer, messages, self.chat_template)
        return ids + self.tokenizer.encode(self.prefix, add_special_tokens=False) if self.prefix else ids

    def task(self, example: Example) -> list[int]:
        """Token ids of an example's first-attempt prompt."""
        return self.encode(task_messages(example, self.reasoning))

    def revision(self, example: Example, previous_completion: str, feedback_text: str) -> list[int]:
        """Token ids of a revision prompt after a previous completion and its feedback."""
        return self.encode(revision_messages(example, self.answer_text(previous_completion), feedback_text, self.reasoning))

    def privileged(self, example: Example, parts: list[str]) -> list[int]:
        """Token ids of the task prompt with privileged reference material (OPSD's teacher only)."""
        return self.encode(privileged_messages(example, parts, self.reasoning))

    def answer_text(self, completion_text: str) -> str:
        """The whole answer as a user reads it: the prefix written for the model, then its completion."""
        return self.prefix + completion_text

    def option_line(self, label: str) -> str:
        """The text the model would generate to answer with `label` (the answer line, less any prefix written for it)."""
        return f"{ANSWER_MARKER} {label}".removeprefix(self.prefix)

    def option_completion(self, label: str) -> list[int]:
        """Token ids the model would generate to answer with `label`."""
        return self.tokenizer.encode(self.option_line(label), add_special_tokens=False)

    def cloze(self, example: Example) -> tuple[list[int], list[str], list[list[int]]]:
        """A multiple-choice example as ranked classification: the bare context's ids (no options listed, no
        instruction, no chat template: the format of published zero-shot figures), each option's continuation
        text, and its ids."""
        continuations = [f" {option.strip()}" for option in example.options]
        encoded = [self.tokenizer.encode(text, add_special_tokens=False) for text in continuations]
        return self.tokenizer.encode(cloze_context(example)), continuations, encoded


PRIVILEGED_INSTRUCTION = (
    "Use it to reply correctly, in the format asked for above, as if you had worked it out yourself."
)


def gold_answer_text(example: Example) -> str:
    """The gold answer as a reader names it: the label, with the option text when the label is a letter or number."""
    if example.is_multiple_choice and example.label_style != "text":
        return f"{example.gold_label} ({example.options[example.gold]})"
    return example.gold_label


def render_privileged(example: Example, parts: list[str]) -> str:
    """Reference material from the example: its facts, worked solution and gold answer, as `parts` select.

    parts: any of "facts", "solution", "answer"; facts and solution are skipped when the example has none.
    """
    lines = []
    if "facts" in parts and example.facts:
        lines.append(f"Facts: {example.facts.strip()}")
    if "solution" in parts and example.solution:
        lines.append(f"Worked solution: {example.solution.strip()}")
    if "answer" in parts:
        lines.append(f"Correct answer: {gold_answer_text(example)}")
    return "\n".join(lines)


def privileged_messages(example: Example, parts: list[str], reasoning: bool = False) -> list[dict[str, str]]:
    """Chat messages of the task, then privileged reference material: the OPSD teacher's prompt, never a student's."""
    task = render_task(example, reasoning)
    content = f"{task}\n\nReference:\n{render_privileged(example, parts)}\n\n{PRIVILEGED_INSTRUCTION}"
    return [{"role": "user", "content": content}]


def cloze_context(example: Example) -> str:
    """The context of a cloze (ranked-classification) item: the dataset's own, else OLMES's generic
    "Question: <question>\nAnswer:", after the passage when there is one.

    >>> cloze_context(Example("t/0", "Which planet has rings?", ("Mars", "Saturn"), 1))
    'Question: Which planet has rings?\nAnswer:'
    """
    if example.cloze_context is not None:
        return example.cloze_context
    passage = f"{example.passage.strip()}\n" if example.passage else ""
    return f"{passage}Question: {example.question.strip()}\nAnswer:"
