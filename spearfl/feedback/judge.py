"""An LLM judge: a local language model, given a rubric, says whether an answer is right.

The judge reads the rubric (system turn), then the question, its options, the reference answer where one is
known (simulation; a person's own question has none and the judge decides from what it knows), and the answer
given; its verdict is whichever of "yes" and "no" it finds likelier as the first word of its reply, scored
with the same option scoring as the held-out evaluation (no sampling, so verdicts repeat exactly). Any
model spearfl can load serves (`feedback.judge_model`: the packaged default, a hub id or a folder).
How far its verdicts agree with the oracle's on a packaged dataset: `spearfl judge`.
"""

from __future__ import annotations

from spearfl.data.prompts import encode_messages
from spearfl.data.schema import Example
from spearfl.data.scoring import answer_text
from spearfl.lm.forward import option_logprobs

DEFAULT_RUBRIC = (
    "You grade answers to questions. An answer is correct when it gives the right option or value; wording, "
    "case and punctuation do not matter. Reply with one word: yes if the answer given is correct, no if it is not."
)
VERDICT_WORDS = ("yes", "no")


class Judge:
    """Verdicts from a local model: `judge(example, completion_text)` -> right?"""

    def __init__(self, model, tokenizer, rubric: str | None = None, chat_template: str = "auto", batch_size: int = 8):
        self.model, self.tokenizer = model, tokenizer
        self.rubric = rubric or DEFAULT_RUBRIC
        self.chat_template, self.batch_size = chat_template, batch_size
        self.words = [tokenizer.encode(word, add_special_tokens=False) for word in VERDICT_WORDS]

    def prompt(self, example: Example, completion_text: str) -> list[int]:
        parts = [f"Question: {example.question.strip()}"]
        if example.is_multiple_choice:
            parts.append("Options: " + "; ".join(example.options))
        if not example.asked:
            parts.append(f"Reference answer: {example.options[example.gold] if example.is_multiple_choice else example.answer}")
        given = answer_text(completion_text) or completion_text.strip() or "(no answer)"
        parts += [f"Answer given: {given}", "Is the answer given correct? Reply yes or no."]
        messages = [{"role": "system", "content": self.rubric}, {"role": "user", "content": "\n".join(parts)}]
        return encode_messages(self.tokenizer, messages, self.chat_template)

    def verdicts(self, examples: list[Example], completion_texts: list[str]) -> list[bool]:
        """One verdict per (example, answer): True where "yes" is likelier than "no"."""
        prompts = [self.prompt(example, text) for example, text in zip(examples, completion_texts)]
        scores = option_logprobs(self.model, prompts, [self.words] * len(prompts), batch_size=self.batch_size)
        return [yes > no for yes, no in scores]

    def __call__(self, example: Example, completion_text: str) -> bool:
        return self.verdicts([example], [completion_text])[0]
