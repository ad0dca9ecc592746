"""What the device service's routes share: the engine, the store, the prompt format, the limits and credentials."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import HTTPException

from spearfl.data.prompts import PromptFormat
from spearfl.data.schema import Example
from spearfl.data.store import InteractionStore
from spearfl.errors import UserError
from spearfl.io import atomic_write_json, read_json
from spearfl.serve.engine import AnswerEngine
from spearfl.serve.limits import Limits
from spearfl.serve.rounds import DeviceRounds

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
RETRY_AFTER_SECONDS = 5  # about one batch of answers on a CPU
RATE_WINDOW_SECONDS = 60.0  # `Limits.answers_per_minute` counts the answers started in the last this many seconds


class AnsweredOrders:
    """The nonces of the work orders this device answered, by round: a notice of a round's outcome must carry its
    round's nonce. Kept in a JSON file (mode 0600), so a restarted device still checks; None: in memory."""

    def __init__(self, path: str | Path | None = None, keep: int = 1000):
        self.path, self.keep, self.lock = None if path is None else Path(path), keep, threading.Lock()
        self.nonces: dict[int, str] = {}
        if self.path is not None and self.path.exists():
            try:
                self.nonces = {int(round_index): str(nonce) for round_index, nonce in read_json(self.path).items()}
            except (ValueError, AttributeError) as error:
                raise UserError(f"{self.path}: not a file of answered work orders ({error}); move it away to start afresh") from None

    def record(self, round_index: int, nonce: str) -> None:
        """Remember the nonce of the work order answered for this round, on disk before the reply leaves."""
        with self.lock:
            self.nonces[round_index] = nonce
            for old in sorted(self.nonces)[: -self.keep]:
                del self.nonces[old]
            if self.path is not None:
                atomic_write_json(self.path, {str(r): n for r, n in self.nonces.items()}, mode=0o600)

    def nonce(self, round_index: int) -> str | None:
        with self.lock:
            return self.nonces.get(round_index)


@dataclass
class Service:
    """What the routes share: the engine, the store, the prompt format, the settings."""

    engine: AnswerEngine
    store: InteractionStore
    prompts: PromptFormat
    label_style: str
    model_name: str
    token: str | None = None  # the people's token: the page, asking, their interactions
    limits: Limits = field(default_factory=Limits)
    rounds: DeviceRounds | None = None  # None: the service answers, but takes no part in rounds
    server_token: str | None = None  # the federation server's token: /worker/* and the counts /health adds for it
    allowed_hosts: frozenset[str] = LOOPBACK_NAMES  # Host names requests may carry (lower case, no port)
    orders: AnsweredOrders = field(default_factory=AnsweredOrders)
    waiting: int = field(default=0, init=False)  # requests handed to the engine and not finished
    waiting_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    started: dict[str, deque] = field(default_factory=dict, init=False, repr=False)  # person -> monotonic start times
    clock: object = field(default=time.monotonic, repr=False)  # () -> seconds; tests move it

    def __post_init__(self) -> None:
        if self.token is not None and self.token == self.server_token:
            raise UserError("the people's token and the server's token must differ: each reaches only its own routes")

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

    def admit(self) -> None:
        """Take a place in the engine's queue, or 503 when `limits.max_waiting_requests` are already waiting."""
        with self.waiting_lock:
            if self.waiting >= self.limits.max_waiting_requests:
                raise HTTPException(
                    503, f"{self.waiting} requests are already waiting for the model; try again shortly",
                    headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
                )
            self.waiting += 1

    def admit_person(self, person: str) -> None:
        """Count an answer `person` starts, or 429 when they started `limits.answers_per_minute` in the last minute."""
        now, limit = self.clock(), self.limits.answers_per_minute
        with self.waiting_lock:
            times = self.started.setdefault(person, deque())
            while times and now - times[0] >= RATE_WINDOW_SECONDS:
                times.popleft()
            if len(times) >= limit:
                wait = max(1, math.ceil(RATE_WINDOW_SECONDS - (now - times[0])))
                raise HTTPException(
                    429, f"{'person ' + repr(person) if person else 'the unnamed person'} started {limit} answers in the "
                    f"last minute (limits.answers_per_minute); try again in {wait} s",
                    headers={"Retry-After": str(wait)},
                )
            times.append(now)
            if len(self.started) > 10_000:  # forget who has not asked for a minute
                for name in [name for name, kept in self.started.items() if now - kept[-1] >= RATE_WINDOW_SECONDS]:
                    del self.started[name]

    def finished(self) -> None:
        with self.waiting_lock:
            self.waiting -= 1
