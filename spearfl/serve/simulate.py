"""Simulated people for a running device service: they ask, judge, hint and judge revisions through its HTTP API.

Each person is a thread with a pool of questions (device i's people ask from client i's partition of the
configured dataset, as the simulation's client i does) and judges like the oracle: the dataset's own scoring
for the verdict, the configured hint style for the hint (never the answer). A wrong answer is revised up to
`spear.num_revisions` times, each revision judged. People on one service ask concurrently, so the service's
batching and store see real concurrency; every request's time to first token and total time are measured.

Left out: think time between requests (people here answer at once, which is the load a benchmark wants).
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import dataclass, field

import httpx
import numpy as np

from spearfl.data.schema import Example
from spearfl.feedback.providers import FeedbackProvider


@dataclass
class Tally:
    """What the people of one service did and how long the service took."""

    asked: int = 0
    first_right: int = 0
    revisions: int = 0
    revisions_right: int = 0
    hints_held_back: int = 0
    errors: list[str] = field(default_factory=list)
    first_token_seconds: list[float] = field(default_factory=list)
    total_seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def summary(self) -> dict:
        def quantile(values: list[float], q: float) -> float | None:
            return float(np.quantile(values, q)) if values else None

        decode = [tokens / seconds for tokens, seconds in zip(self.tokens, self.total_seconds) if seconds > 0]
        return {
            "asked": self.asked, "first_try_accuracy": self.first_right / self.asked if self.asked else None,
            "revisions": self.revisions, "revisions_right": self.revisions_right, "hints_held_back": self.hints_held_back,
            "errors": len(self.errors),
            "first_token_s_median": quantile(self.first_token_seconds, 0.5), "first_token_s_p95": quantile(self.first_token_seconds, 0.95),
            "request_s_median": quantile(self.total_seconds, 0.5), "request_s_p95": quantile(self.total_seconds, 0.95),
            "tokens_per_s_median": statistics.median(decode) if decode else None,
            "tokens_per_s_p95": quantile(decode, 0.95),
        }


def stream(client: httpx.Client, path: str, body: dict | None, tally: Tally) -> dict:
    """One streamed answer: the `done` event, with its timings recorded."""
    started, first = time.perf_counter(), None
    done = None
    with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            raise httpx.HTTPStatusError(f"{path}: {response.status_code} {response.read()[:300]!r}", request=response.request, response=response)
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
                if event == "token" and first is None and not data.get("prefix"):  # the first generated token
                    first = time.perf_counter() - started
                elif event == "done":
                    done = data
                elif event == "error":
                    raise RuntimeError(f"{path}: {data.get('detail')}")
    if done is None:
        raise RuntimeError(f"{path}: the stream ended without an answer")
    with tally.lock:
        tally.first_token_seconds.append(first if first is not None else time.perf_counter() - started)
        tally.total_seconds.append(time.perf_counter() - started)
        tally.tokens.append(done["completion_tokens"])
    return done


def one_question(client: httpx.Client, example: Example, judge: FeedbackProvider, revisions: int, person: str, tally: Tally) -> None:
    """Ask, judge, and revise a wrong answer up to `revisions` times, judging each revision."""
    done = stream(client, "/ask", {"question": example.question, "options": list(example.options) or None, "person": person}, tally)
    interaction, attempt = done["interaction_id"], 0
    feedback = judge(example, done["text"])
    with tally.lock:
        tally.asked += 1
        tally.first_right += feedback.correct
    while True:
        verdict = client.post(f"/interactions/{interaction}/verdict",
                              json={"attempt": attempt, "correct": feedback.correct, "hint": None if feedback.correct else feedback.hint})
        verdict.raise_for_status()
        with tally.lock:
            tally.hints_held_back += bool(feedback.hint) and not feedback.correct and not verdict.json()["hint_shown"]
        if feedback.correct or attempt == revisions:
            return
        done = stream(client, f"/interactions/{interaction}/revise", None, tally)
        attempt = done["attempt"]
        feedback = judge(example, done["text"])
        with tally.lock:
            tally.revisions += 1
            tally.revisions_right += feedback.correct


def simulate_people(
    url: str, questions: list[list[Example]], judge: FeedbackProvider, revisions: int, token: str | None = None,
    timeout: float = 600.0,
) -> Tally:
    """One thread per person, person k asking `questions[k]` in order; returns the service's tally."""
    tally = Tally()
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def person(index: int) -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=timeout) as client:
            for example in questions[index]:
                try:
                    one_question(client, example, judge, revisions, f"simulated-{index}", tally)
                except (httpx.HTTPError, RuntimeError) as error:
                    with tally.lock:
                        tally.errors.append(f"{example.uid}: {error}")

    threads = [threading.Thread(target=person, args=(index,)) for index in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally


def deal(examples: list[Example], num_people: int, num_questions: int, seed: int) -> list[list[Example]]:
    """`num_questions` examples drawn (with replacement once the pool runs out) and dealt round-robin to the people."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(len(examples)) for _ in range(-(-num_questions // len(examples)))])[:num_questions]
    return round_robin([examples[int(index)] for index in order], num_people)


def round_robin(questions: list[Example], num_people: int) -> list[list[Example]]:
    """Question k to person k mod num_people; no person without a question."""
    return [questions[person::num_people] for person in range(min(num_people, len(questions)))]
