"""What the device service's routes share: the engine, the store, the prompt format and the limits."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import HTTPException

from spearfl.data.prompts import PromptFormat
from spearfl.data.schema import Example
from spearfl.data.store import InteractionStore
from spearfl.serve.engine import AnswerEngine
from spearfl.serve.limits import Limits
from spearfl.serve.rounds import DeviceRounds


@dataclass
class Service:
    """What the routes share: the engine, the store, the prompt format, the settings."""

    engine: AnswerEngine
    store: InteractionStore
    prompts: PromptFormat
    label_style: str
    model_name: str
    token: str | None = None
    limits: Limits = field(default_factory=Limits)
    rounds: DeviceRounds | None = None  # None: the service answers, but takes no part in rounds

    def question(self, text: str, options: list[str] | None) -> Example:
        """A person's question in the task format the device trains on (no gold: the person judges)."""
        return Example(uid="person", question=text, options=tuple(options or ()), label_style=self.label_style, asked=True)

    def task_prompt(self, example: Example) -> list[int]:
        return self.check_length(self.prompts.task(example))

    def require_rounds(self) -> DeviceRounds:
        if self.rounds is None:
            raise HTTPException(404, "this service takes no part in federated rounds")
        return self.rounds

    def check_length(self, prompt_ids: list[int]) -> list[int]:
        if len(prompt_ids) > self.limits.max_prompt_tokens:
            raise HTTPException(422, f"the prompt is {len(prompt_ids)} tokens; the limit is {self.limits.max_prompt_tokens}")
        return prompt_ids
