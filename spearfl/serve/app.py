"""The device service's HTTP side: people ask, judge and hint, the model answers and revises, all stored on the device.

    GET    /                                  the page (phone-sized screens too)
    GET    /health                            status and the adapter version answering
    POST   /ask                               {question, options?, person?} -> server-sent events: token..., done
    POST   /interactions/{id}/verdict         {attempt, correct, hint?} -> whether the hint is shown to the model
    POST   /interactions/{id}/revise          -> server-sent events: token..., done (the revision)
    GET    /interactions?person=&limit=       one's interactions, newest first
    GET    /interactions/{id}                 one interaction
    DELETE /interactions/{id}?person=         delete it: no later round trains on it
    GET    /learning, /learning.png           first-try accuracy per adapter version, as numbers and as a plot
    POST   /v1/chat/completions               OpenAI-compatible (stream or not); the reply carries interaction_id
    GET    /docs                              OpenAPI documentation
    POST   /worker/train, /worker/result      the server's work orders and its word on them (`spearfl.serve.rounds`)

Every answer is stored with its prompt and generated token ids and the adapter version that wrote it. A hint
that states an option is kept but not shown to the model (`spearfl.feedback.person`). With an access token
set, every data endpoint needs `Authorization: Bearer <token>`; request bodies and questions have limits, and
a bad request gets a 4xx that says why and stores nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib import resources
from typing import Annotated

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from spearfl.data.prompts import PromptFormat
from spearfl.data.schema import Example
from spearfl.data.store import (
    Attempt,
    Interaction,
    InteractionStore,
    StoreError,
    UnknownInteraction,
)
from spearfl.errors import UserError
from spearfl.feedback.person import gave_the_number, states_an_option
from spearfl.feedback.providers import Feedback
from spearfl.runtime.worker import pack, unpack
from spearfl.serve.engine import AnswerEngine, Reply, request_seed
from spearfl.serve.rounds import DeviceRounds

HELD_BACK = "the hint names an option, so it is kept for the record but not shown to the model"
GAVE_ANSWER = "the hint held the number you marked right, so this revision is not trained on as a win"


@dataclass(frozen=True)
class Limits:
    """What one request may hold; beyond it the service answers 413 or 422 and stores nothing."""

    max_body_bytes: int = 64 * 1024
    max_question_chars: int = 4000
    max_option_chars: int = 500
    max_options: int = 26
    max_hint_chars: int = 1000
    max_prompt_tokens: int = 1024
    max_person_chars: int = 100
    max_adapter_bytes: int = 1 << 30  # a work order carries the global adapter


@dataclass
class Service:
    """What the routes share: the engine, the store, the prompt format, the settings."""

    engine: AnswerEngine
    store: InteractionStore
    prompts: PromptFormat
    label_style: str
    model_name: str
    token: str | None = None
    limits: Limits = Limits()
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


# ---------------------------------------------------------------------------------------------- request bodies


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AskBody(Strict):
    question: str = Field(min_length=1, max_length=Limits.max_question_chars)
    options: list[Annotated[str, Field(min_length=1, max_length=Limits.max_option_chars)]] | None = Field(
        None, min_length=2, max_length=Limits.max_options
    )
    person: str = Field("", max_length=Limits.max_person_chars)

    @field_validator("question")
    @classmethod
    def not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the question is blank")
        return value


class VerdictBody(Strict):
    attempt: int = Field(ge=0)
    correct: bool
    hint: str | None = Field(None, max_length=Limits.max_hint_chars)


class ChatMessage(BaseModel):
    role: str
    content: str = Field(max_length=Limits.max_question_chars)


class ChatBody(BaseModel):
    """OpenAI's chat completion request; fields spearfl does not use (temperature, ...) are accepted and ignored:
    the device answers with its own sampling settings, the ones it trains on."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=64)
    stream: bool = False
    options: list[Annotated[str, Field(min_length=1, max_length=Limits.max_option_chars)]] | None = Field(
        None, min_length=2, max_length=Limits.max_options
    )  # spearfl's own: the question's options, for a multiple-choice question
    user: str = Field("", max_length=Limits.max_person_chars)


# ---------------------------------------------------------------------------------------------- the app


def create_app(service: Service) -> FastAPI:
    app = FastAPI(
        title="spearfl device service",
        description="Ask, judge, hint and revise; the device learns from your verdicts. Nothing leaves the device but the adapter.",
    )
    app.state.service = service
    app.add_middleware(BodyLimit, limit=service.limits.max_body_bytes, adapter_limit=service.limits.max_adapter_bytes)

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if service.token is not None and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {service.token}".encode()):
                return JSONResponse({"detail": "missing or wrong access token (Authorization: Bearer <token>)"}, 401)
        return await call_next(request)

    @app.exception_handler(UnknownInteraction)
    async def unknown(request: Request, error: UnknownInteraction):
        return JSONResponse({"detail": str(error)}, 404)

    @app.exception_handler(StoreError)
    async def conflict(request: Request, error: StoreError):
        return JSONResponse({"detail": str(error)}, 409)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files("spearfl.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "adapter_version": service.engine.adapter_version, "model": service.model_name,
                "token_required": service.token is not None, "pending": service.store.count_pending()}

    @app.post("/ask", summary="Ask a question; the answer streams as server-sent events (token..., done)")
    async def ask(body: AskBody) -> StreamingResponse:
        example = service.question(body.question, body.options)
        prompt_ids = service.task_prompt(example)

        def record(reply: Reply) -> dict:
            interaction_id = service.store.add(body.question, attempt_of(reply, service), body.options, body.person)
            return done_event(reply, service, interaction_id, attempt=0)

        return event_stream(service, prompt_ids, request_seed(uuid.uuid4().hex, 0), record)

    @app.post("/interactions/{interaction_id}/verdict", summary="Judge an attempt, with an optional hint")
    def verdict(interaction_id: str, body: VerdictBody) -> dict:
        interaction = service.store.get(interaction_id)
        example = service.question(interaction.question, interaction.options)
        withheld = body.hint is not None and not body.correct and states_an_option(example, body.hint)
        service.store.judge(interaction_id, body.attempt, body.correct, body.hint, withheld)
        result = {"interaction_id": interaction_id, "attempt": body.attempt, "correct": body.correct,
                  "hint_shown": body.hint is not None and not withheld and not body.correct}
        if withheld:
            result["note"] = HELD_BACK
        if body.correct and body.attempt > 0:
            previous = interaction.attempts[body.attempt - 1]
            right = interaction.attempts[body.attempt]
            if previous.hint and not previous.hint_withheld and gave_the_number(example, previous.hint, service.prompts.answer_text(right.text)):
                service.store.mark_hint_gave_answer(interaction_id, body.attempt - 1)
                result["note"] = GAVE_ANSWER
        return result

    @app.post("/interactions/{interaction_id}/revise", summary="Revise the latest wrong attempt; streams like /ask")
    async def revise(interaction_id: str) -> StreamingResponse:
        interaction = service.store.get(interaction_id)
        latest = interaction.attempts[-1]
        if latest.verdict is None:
            raise HTTPException(409, f"interaction {interaction_id}: judge attempt {len(interaction.attempts) - 1} first")
        if latest.verdict:
            raise HTTPException(409, f"interaction {interaction_id}: attempt {len(interaction.attempts) - 1} was judged right")
        example = service.question(interaction.question, interaction.options)
        shown_hint = None if latest.hint_withheld else latest.hint
        feedback = Feedback(correct=False, hint=shown_hint, style="person")
        prompt_ids = service.check_length(service.prompts.revision(example, latest.text, feedback.text))

        def record(reply: Reply) -> dict:
            number = service.store.add_revision(interaction_id, attempt_of(reply, service))
            return done_event(reply, service, interaction_id, attempt=number)

        return event_stream(service, prompt_ids, request_seed(interaction_id, len(interaction.attempts)), record)

    @app.get("/interactions")
    def interactions(person: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict]:
        return [interaction_view(interaction) for interaction in service.store.recent(person, limit)]

    @app.get("/interactions/{interaction_id}")
    def interaction(interaction_id: str) -> dict:
        return interaction_view(service.store.get(interaction_id))

    @app.delete("/interactions/{interaction_id}", status_code=204)
    def delete(interaction_id: str, person: str | None = None) -> Response:
        service.store.delete(interaction_id, person)
        return Response(status_code=204)

    @app.get("/learning", summary="First-try accuracy of the answers people judged, per adapter version")
    def learning() -> dict:
        return {"adapter_version": service.engine.adapter_version, "versions": learning_rows(service.store)}

    @app.get("/learning.png", include_in_schema=False)
    def learning_plot() -> Response:
        return Response(plot_learning(learning_rows(service.store)), media_type="image/png")

    @app.post("/v1/chat/completions", summary="OpenAI-compatible chat completion; the reply carries interaction_id")
    async def chat(body: ChatBody) -> Response:
        questions = [message.content for message in body.messages if message.role == "user"]
        if not questions or not questions[-1].strip():
            raise HTTPException(422, "messages: no user message with a question")
        example = service.question(questions[-1], body.options)
        prompt_ids = service.task_prompt(example)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def record(reply: Reply) -> dict:
            interaction_id = service.store.add(questions[-1], attempt_of(reply, service), body.options, body.user)
            return done_event(reply, service, interaction_id, attempt=0)

        if body.stream:
            return chat_stream(service, prompt_ids, record, completion_id, created)
        done = await answer_once(service, prompt_ids, request_seed(completion_id), record)
        return JSONResponse(chat_completion(done, service, completion_id, created, len(prompt_ids)))

    @app.post("/worker/train", include_in_schema=False)
    async def worker_train(request: Request) -> Response:
        rounds = service.require_rounds()
        arrays, header = read_payload(await request.body())
        try:
            state, result = await asyncio.to_thread(rounds.train_arrays, arrays, header)
        except (UserError, TypeError, KeyError, ValueError) as error:
            raise HTTPException(400, f"bad work order: {error}") from None
        return Response(pack(state, result), media_type="application/octet-stream")

    @app.post("/worker/result", include_in_schema=False)
    async def worker_result(request: Request) -> dict:
        rounds = service.require_rounds()
        arrays, header = read_payload(await request.body())
        state = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in arrays.items()} or None
        try:
            round_index, accepted, version = int(header["round"]), header.get("accepted"), header.get("version")
            consumed = await asyncio.to_thread(rounds.settle, round_index, bool(accepted), state, version) if accepted is not None else 0
            if accepted is None and state is not None:
                await asyncio.to_thread(lambda: service.engine.install(state, int(version)).result())
        except (KeyError, TypeError, ValueError) as error:
            raise HTTPException(400, f"bad round result: {error}") from None
        return {"round": round_index, "consumed": consumed, "adapter_version": service.engine.adapter_version}

    return app


def read_payload(body: bytes) -> tuple[dict[str, np.ndarray], dict]:
    try:
        return unpack(body)
    except ValueError as error:
        raise HTTPException(400, f"bad payload: {error}") from None


OPEN_PATHS = {"/", "/health", "/docs", "/openapi.json", "/docs/oauth2-redirect"}


# ---------------------------------------------------------------------------------------------- helpers


def attempt_of(reply: Reply, service: Service) -> Attempt:
    completion = reply.completion
    return Attempt(reply.prompt_ids, service.prompts.answer_text(completion.text), completion.token_ids,
                   reply.adapter_version, completion.finished_by)


def done_event(reply: Reply, service: Service, interaction_id: str, attempt: int) -> dict:
    return {"interaction_id": interaction_id, "attempt": attempt, "text": service.prompts.answer_text(reply.completion.text),
            "adapter_version": reply.adapter_version, "finished_by": reply.completion.finished_by,
            "completion_tokens": len(reply.completion.token_ids)}


def events(service: Service, prompt_ids: list[int], seed: int) -> AsyncIterator[tuple[str, object]]:
    """The engine's events for one request, as an async iterator on the caller's event loop."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    service.engine.submit(prompt_ids, seed, lambda kind, value: loop.call_soon_threadsafe(queue.put_nowait, (kind, value)))

    async def iterate():
        while True:
            kind, value = await queue.get()
            yield kind, value
            if kind != "token":
                return

    return iterate()


def sse(event: str, data: object) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def event_stream(service: Service, prompt_ids: list[int], seed: int, record) -> StreamingResponse:
    """Server-sent events: `token` {text} as the answer grows, then `done` (what `record` stored) or `error`."""

    async def stream():
        prefix = service.prompts.prefix
        if prefix:  # the reply's opening the prompt already wrote (prompt.answer_prefix): shown, not generated
            yield sse("token", {"text": prefix, "prefix": True})
        async for kind, value in events(service, prompt_ids, seed):
            if kind == "token":
                yield sse("token", {"text": value})
            elif kind == "done":
                try:
                    yield sse("done", await asyncio.to_thread(record, value))
                except StoreError as error:
                    yield sse("error", {"detail": str(error)})
            else:
                yield sse("error", {"detail": value})

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


async def answer_once(service: Service, prompt_ids: list[int], seed: int, record) -> dict:
    async for kind, value in events(service, prompt_ids, seed):
        if kind == "done":
            return await asyncio.to_thread(record, value)
        if kind == "error":
            raise HTTPException(500, value)
    raise HTTPException(500, "the answer ended without a result")


def chat_completion(done: dict, service: Service, completion_id: str, created: int, prompt_tokens: int) -> dict:
    return {
        "id": completion_id, "object": "chat.completion", "created": created, "model": service.model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": done["text"]},
                     "finish_reason": "length" if done["finished_by"] == "length" else "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": done["completion_tokens"],
                  "total_tokens": prompt_tokens + done["completion_tokens"]},
        "interaction_id": done["interaction_id"], "adapter_version": done["adapter_version"],
    }


def chat_stream(service: Service, prompt_ids: list[int], record, completion_id: str, created: int) -> StreamingResponse:
    """OpenAI's streaming format: `data: {chunk}` lines, the last chunk with interaction_id, then `data: [DONE]`."""

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": service.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    async def stream():
        yield chunk({"role": "assistant", "content": service.prompts.prefix})
        async for kind, value in events(service, prompt_ids, request_seed(completion_id)):
            if kind == "token":
                yield chunk({"content": value})
            elif kind == "done":
                done = await asyncio.to_thread(record, value)
                finish = "length" if done["finished_by"] == "length" else "stop"
                yield chunk({}, finish, interaction_id=done["interaction_id"], adapter_version=done["adapter_version"])
            else:
                yield f"data: {json.dumps({'error': {'message': value}})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})


def interaction_view(interaction: Interaction) -> dict:
    return {
        "id": interaction.id, "question": interaction.question, "options": interaction.options,
        "person": interaction.owner, "created_at": interaction.created_at, "consumed_round": interaction.consumed_round,
        "attempts": [
            {"text": a.text, "adapter_version": a.adapter_version, "verdict": a.verdict, "hint": a.hint,
             "hint_shown": a.hint is not None and not a.hint_withheld, "hint_gave_answer": a.hint_gave_answer}
            for a in interaction.attempts
        ],
    }


def learning_rows(store: InteractionStore) -> list[dict]:
    return [{"version": version, "judged": judged, "right": right, "first_try_accuracy": right / judged}
            for version, (judged, right) in store.first_try_accuracy().items()]


def plot_learning(rows: list[dict]) -> bytes:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3), dpi=100)
    axes = figure.add_subplot()
    if rows:
        axes.plot([row["version"] for row in rows], [row["first_try_accuracy"] for row in rows], marker="o")
    axes.set(xlabel="adapter version (round)", ylabel="first-try accuracy", ylim=(0, 1), title="answers judged right")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


class BodyLimit:
    """ASGI middleware: a request body over the limit gets 413, whether it declares its length or streams.
    Work orders (/worker/...) carry an adapter and have their own, larger limit."""

    def __init__(self, app, limit: int, adapter_limit: int):
        self.app, self.limit, self.adapter_limit = app, limit, adapter_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.adapter_limit if scope["path"].startswith("/worker/") else self.limit
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await too_large(limit, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge
            return message

        try:
            return await self.app(scope, counting_receive, send)
        except BodyTooLarge:
            return await too_large(limit, send)


class BodyTooLarge(Exception):
    pass


async def too_large(limit: int, send) -> None:
    body = json.dumps({"detail": f"request body over the {limit}-byte limit"}).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})

