"""The device's answering engine: the base model with the latest global adapter, decoding people's requests together.

Requests wait in a queue. One decoding thread takes every request waiting (up to `max_batch`), after giving
others `batch_window` seconds to arrive, and decodes them as one batch with a key/value cache, streaming each
row's text to its request as the tokens are chosen. Batching pays on a CPU as on a GPU: a decode step of 16 rows
costs little more than one of a single row (the weights are read once per step), see docs/performance.md.

A new global adapter is installed between batches: a request in flight finishes on the adapter it started with,
the next batch answers with the new one, and every reply names the version that produced it. Other work on the
model (a training round) runs on the same thread between batches (`run_exclusive`), so it never races a decode.

Left out: adding requests to a batch already decoding (continuous batching): a request that arrives mid-batch
waits for the batch to end, at most `max_new_tokens` steps.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from spearfl.lm.generation import Completion, SamplingSettings, generate_batch
from spearfl.lm.models import evaluation_mode, get_adapter_state, set_adapter_state

REPLACEMENT_CHARACTER = "\ufffd"  # what a partial UTF-8 sequence decodes to: held back until it completes


@dataclass
class Reply:
    """One request's reply as it streams: text deltas, then the completion and the adapter version that wrote it."""

    prompt_ids: list[int]
    seed: int
    on_event: Callable[[str, Any], None]  # ("token", text delta), ("done", self), ("error", message)
    token_ids: list[int] = field(default_factory=list)
    sent: str = ""
    completion: Completion | None = None
    adapter_version: int = -1


class AnswerEngine:
    """Decodes people's requests in batches on one thread; installs new adapters between batches."""

    def __init__(self, model, tokenizer, settings: SamplingSettings, adapter_version: int = 0,
                 max_batch: int = 16, batch_window: float = 0.02):
        self.model, self.tokenizer, self.settings = model, tokenizer, settings
        self.adapter_version = adapter_version
        self.max_batch, self.batch_window = max_batch, batch_window
        self.requests: queue.Queue[Reply | Callable | None] = queue.Queue()
        self.thread = threading.Thread(target=self.serve, name="spearfl-answer-engine", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------------------------------- callers' side

    def submit(self, prompt_ids: list[int], seed: int, on_event: Callable[[str, Any], None]) -> Reply:
        """Queue one reply; `on_event` is called from the engine's thread."""
        reply = Reply(list(prompt_ids), seed, on_event)
        self.requests.put(reply)
        return reply

    def run_exclusive(self, work: Callable[[], Any]) -> Future:
        """Run `work()` on the engine's thread between batches (the model is not decoding meanwhile)."""
        future: Future = Future()

        def job() -> None:
            try:
                future.set_result(work())
            except BaseException as error:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(error)

        self.requests.put(job)
        return future

    def install(self, state: dict[str, torch.Tensor], version: int) -> Future:
        """Answer with this global adapter from the next batch on."""

        def switch() -> int:
            set_adapter_state(self.model, state)
            self.adapter_version = version
            return version

        return self.run_exclusive(switch)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """A copy of the adapter now answering (taken between batches)."""
        return self.run_exclusive(lambda: get_adapter_state(self.model)).result()

    def close(self) -> None:
        self.requests.put(None)
        self.thread.join(timeout=60)

    # ------------------------------------------------------------------------------------------- engine's side

    def serve(self) -> None:
        while True:
            item = self.requests.get()
            if item is None:
                return
            if callable(item):
                item()
                continue
            batch = [item, *self.companions()]
            self.decode([reply for reply in batch if isinstance(reply, Reply)])
            for other in batch:  # jobs and the stop signal that arrived while gathering come after the batch
                if other is None:
                    return
                if callable(other):
                    other()

    def companions(self) -> list:
        """Whatever else arrives within the batch window, up to `max_batch` replies in all; a job or the stop
        signal closes the batch early (it runs right after the batch)."""
        gathered: list = []
        deadline = time.monotonic() + self.batch_window
        while len(gathered) < self.max_batch - 1:
            remaining = deadline - time.monotonic()
            try:
                item = self.requests.get(timeout=remaining) if remaining > 0 else self.requests.get_nowait()
            except queue.Empty:
                break
            gathered.append(item)
            if not isinstance(item, Reply):
                break
        return gathered

    def decode(self, replies: list[Reply]) -> None:
        version = self.adapter_version
        generators = [torch.Generator().manual_seed(reply.seed) for reply in replies]

        def on_token(row: int, token: int, finished_by: str | None) -> None:
            reply = replies[row]
            reply.token_ids.append(token)
            text = self.tokenizer.decode(reply.token_ids, skip_special_tokens=True)
            if not text.endswith(REPLACEMENT_CHARACTER) and text.startswith(reply.sent) and len(text) > len(reply.sent):
                reply.on_event("token", text[len(reply.sent):])
                reply.sent = text

        try:
            with evaluation_mode(self.model):
                completions = generate_batch(
                    self.model, self.tokenizer, [reply.prompt_ids for reply in replies], generators, self.settings,
                    on_token=on_token,
                )
        except Exception as error:  # noqa: BLE001 - every waiting person hears of it; the engine keeps serving
            for reply in replies:
                reply.on_event("error", f"generation failed: {error}")
            return
        for reply, completion in zip(replies, completions):
            if completion.text.startswith(reply.sent) and len(completion.text) > len(reply.sent):
                reply.on_event("token", completion.text[len(reply.sent):])  # what a partial character held back
                reply.sent = completion.text
            reply.completion, reply.adapter_version = completion, version
            reply.on_event("done", reply)


def request_seed(*parts: object) -> int:
    """A sampling seed from the parts that identify a request (a fresh id, the attempt), never colliding by sum."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
