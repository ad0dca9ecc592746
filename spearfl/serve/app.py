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
import time
import uuid
from importlib import resources
from typing import Annotated

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

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
from spearfl.serve.engine import Reply, request_seed
from spearfl.serve.limits import BodyLimit, Limits
from spearfl.serve.openai import ChatBody, chat_completion, chat_stream
from spearfl.serve.service import Service
from spearfl.serve.streaming import answer_once, event_stream

HELD_BACK = "the hint names an option, so it is kept for the record but not shown to the model"
GAVE_ANSWER = "the hint held the number you marked right, so this revision is not trained on as a win"


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

        record = first_answer_recorder(service, body.question, body.options, body.person)
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

        record = first_answer_recorder(service, questions[-1], body.options, body.user)
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
            round_index, accepted = int(header["round"]), header.get("accepted")
            version = int(header["version"]) if state is not None else None
            consumed = await asyncio.to_thread(rounds.settle, round_index, accepted, state, version)
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


def first_answer_recorder(service: Service, question: str, options: list[str] | None, person: str):
    """What stores a new interaction once its first answer is done, and says what the `done` event carries."""

    def record(reply: Reply) -> dict:
        interaction_id = service.store.add(question, attempt_of(reply, service), options, person)
        return done_event(reply, service, interaction_id, attempt=0)

    return record


def attempt_of(reply: Reply, service: Service) -> Attempt:
    completion = reply.completion
    return Attempt(reply.prompt_ids, service.prompts.answer_text(completion.text), completion.token_ids,
                   reply.adapter_version, completion.finished_by)


def done_event(reply: Reply, service: Service, interaction_id: str, attempt: int) -> dict:
    return {"interaction_id": interaction_id, "attempt": attempt, "text": service.prompts.answer_text(reply.completion.text),
            "adapter_version": reply.adapter_version, "finished_by": reply.completion.finished_by,
            "completion_tokens": len(reply.completion.token_ids)}


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
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(5, 3), dpi=100)
    axes = figure.add_subplot()
    if rows:
        versions = [row["version"] for row in rows]
        axes.plot(versions, [row["first_try_accuracy"] for row in rows], marker="o")
        axes.set_xlim(min(versions) - 0.5, max(versions) + 0.5)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # versions are rounds
    axes.set(xlabel="adapter version (round)", ylabel="first-try accuracy", ylim=(0, 1), title="answers judged right")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


