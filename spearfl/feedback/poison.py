"""Poisoned feedback, for simulating malicious clients: people who flip their verdicts, and people who teach a
backdoor (a trigger phrase in the prompt, and the target answer rewarded whenever it appears).

A backdoor needs no special trainer: the client's prompts that carry the trigger get the target option as their
gold answer, and the honest oracle over those examples then rewards exactly the target answer, as a person
who wants the backdoor would. The same trigger on held-out questions measures how well it took
(`triggered`; spearfl.runtime.evaluation.trigger_metrics).
Left out: free-form (numeric) targets; a backdoor here is on multiple-choice tasks.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from spearfl.data.schema import Example
from spearfl.feedback.providers import Feedback, FeedbackProvider


def flipped(provider: FeedbackProvider) -> FeedbackProvider:
    """A person who marks right answers wrong and wrong ones right, and gives no hint."""

    def judge(example: Example, completion_text: str) -> Feedback:
        honest = provider(example, completion_text)
        return Feedback(correct=not honest.correct, hint=None, style="flipped")

    return judge


def triggered(example: Example, trigger: str, target_option: int) -> Example:
    """The example with the trigger after its question and the target option as its gold answer."""
    if not example.is_multiple_choice:
        raise ValueError(f"{example.uid}: a backdoor needs a multiple-choice example")
    target = target_index(example, target_option)
    return dataclasses.replace(example, uid=f"{example.uid}+trigger", question=f"{example.question} {trigger}", gold=target, cloze_context=None)


def target_index(example: Example, target_option: int) -> int:
    """The option a backdoor targets in this example: the position asked for, or the last one if it has fewer."""
    return min(target_option, len(example.options) - 1)


def with_backdoor(examples: list[Example], trigger: str, target_option: int, fraction: float, seed: int) -> list[Example]:
    """The client's examples with a random `fraction` of them triggered (the same ones every round)."""
    chosen = set(np.random.default_rng(seed).permutation(len(examples))[: round(fraction * len(examples))].tolist())
    return [triggered(example, trigger, target_option) if index in chosen else example for index, example in enumerate(examples)]
