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
    GET    /personal                          which adapter answers (personal or global), and both versions
    POST   /personal/reset                    drop the personal adapter: the global one answers (`spearfl.serve.personal`)
    POST   /v1/chat/completions               OpenAI-compatible (stream or not); the reply carries interaction_id
    GET    /docs                              OpenAPI documentation
    POST   /worker/train, /worker/result      the server's work orders and its word on them (`spearfl.serve.rounds`)

Every answer is stored with its prompt and generated token ids and the adapter version that wrote it. A hint
that states an option is kept but not shown to the model (`spearfl.feedback.person`).

Two credentials, each reaching only its own routes (`Authorization: Bearer <token>`): the people's token (the
page, asking, their interactions, /learning, /v1/...) and the federation server's token (/worker/*, and the
pending count /health adds for it). A request carrying one on the other's routes gets 403, so the server can
never read an interaction; a route whose token is unset is open (the loopback default). Listing everyone's
interactions (GET /interactions without `person`) is refused while a people's token is set: the token is a
household's, and each lists their own. Every request must name an allowed Host (421 otherwise: no DNS
rebinding), none from another origin is served (403, preflights included; no CORS headers are sent), bodies
must be application/json, or application/octet-stream on /worker/* (415). An adapter from outside (a work
order's, a round's notice) passes the checks a client's reply passes, and a notice must bring a newer version
than the one answering and the nonce of the work order this device answered for its round (409). Request bodies
and questions have limits, at most `limits.max_waiting_requests` answers wait for the model (503 beyond), one
person starts at most `limits.answers_per_minute` answers a minute (429 beyond), and a
bad request gets a 4xx that says why and stores nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import time
import uuid
from importlib import resources
from typing import Annotated

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
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
from spearfl.federated.codec import InvalidReply, Layout, check_arrays, layout_of, wire_array
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


class EscapedJSON(JSONResponse):
    """JSON in ASCII: a 422 quotes the input it refused, which may hold a lone surrogate that UTF-8 cannot carry."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


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
    async def guard(request: Request, call_next):
        request.state.credential = credential(service, request.headers.get("authorization", ""))
        refused = refusal(service, request)
        return refused if refused is not None else await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return EscapedJSON({"detail": jsonable_encoder(error.errors())}, 422)

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
    def health(request: Request) -> dict:
        status = {"status": "ok", "adapter_version": service.engine.adapter_version, "model": service.model_name,
                  "token_required": service.token is not None}
        if request.state.credential == SERVER or service.server_token is None:  # what the server polls for
            status["pending"] = service.store.count_pending()
        return status

    @app.post("/ask", summary="Ask a question; the answer streams as server-sent events (token..., done)")
    async def ask(body: AskBody) -> StreamingResponse:
        example = service.question(body.question, body.options)
        prompt_ids = service.task_prompt(example)
        service.admit_person(body.person)

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
        service.admit_person(interaction.owner)

        def record(reply: Reply) -> dict:
            number = service.store.add_revision(interaction_id, attempt_of(reply, service))
            return done_event(reply, service, interaction_id, attempt=number)

        return event_stream(service, prompt_ids, request_seed(interaction_id, len(interaction.attempts)), record)

    @app.get("/interactions")
    def interactions(person: str | None = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict]:
        if person is None and service.token is not None:
            raise HTTPException(403, "name the person (?person=): with a people's token set, everyone's interactions "
                                     "are listed only on the device itself (its store, or a service on loopback without a token)")
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

    @app.get("/personal", summary="Which adapter answers here, the personal or the global one, and what made each")
    def personal() -> dict:
        return service.require_rounds().personal_view()

    @app.post("/personal/reset", summary="Drop this device's personal adapter: the global adapter answers again")
    async def personal_reset() -> dict:
        rounds = service.require_rounds()
        await asyncio.to_thread(rounds.reset_personal)
        return rounds.personal_view()

    @app.get("/privacy", summary="This device's local differential privacy: its settings, releases and epsilon spent")
    def privacy() -> dict:
        return service.require_rounds().privacy()

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
        service.admit_person(body.user)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        record = first_answer_recorder(service, questions[-1], body.options, body.user)
        if body.stream:
            return chat_stream(service, prompt_ids, record, completion_id, created)
        done = await answer_once(service, prompt_ids, request_seed(completion_id), record)
        return JSONResponse(chat_completion(done, service, completion_id, created, len(prompt_ids)))

    layout: Layout = {}
    notices = asyncio.Lock()  # one round's notice at a time: its version check and its install are one step

    async def check_adapter(arrays: dict[str, np.ndarray]) -> None:
        """422 unless `arrays` have the layout of the adapter answering (keys, shapes, float32) and finite values."""
        if not layout:
            state = await asyncio.to_thread(service.engine.adapter_state)
            layout.update(layout_of({name: wire_array(tensor) for name, tensor in state.items()}))
        try:
            check_arrays(arrays, layout)
        except InvalidReply as error:
            raise HTTPException(422, f"the adapter fails its checks: {error}") from None

    @app.post("/worker/train", include_in_schema=False)
    async def worker_train(request: Request) -> Response:
        rounds = service.require_rounds()
        arrays, header = read_payload(await request.body())
        await check_adapter(arrays)
        try:
            state, result = await asyncio.to_thread(answer_work_order, service, rounds, arrays, header)
        except (UserError, TypeError, KeyError, ValueError) as error:
            raise HTTPException(400, f"bad work order: {error}") from None
        return Response(pack(state, result), media_type="application/octet-stream")

    @app.post("/worker/result", include_in_schema=False)
    async def worker_result(request: Request) -> dict:
        rounds = service.require_rounds()
        arrays, header = read_payload(await request.body())
        round_index, accepted, version = read_notice(header, bool(arrays))
        ends_federation = header.get("ends_federation", False)
        if not isinstance(ends_federation, bool) or (ends_federation and not arrays):
            raise HTTPException(400, "bad round result: ends_federation must be true or false, and true only with the global adapter")
        check_nonce(service, round_index, accepted, header.get("nonce"))
        async with notices:
            state = None
            if arrays:
                if version <= service.engine.adapter_version:
                    raise HTTPException(409, f"adapter version {version} is not newer than version "
                                             f"{service.engine.adapter_version}, which answers now (a replayed notice?)")
                await check_adapter(arrays)
                state = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in arrays.items()}
            consumed = await asyncio.to_thread(rounds.settle, round_index, accepted, state, version, ends_federation)
        return {"round": round_index, "consumed": consumed, "adapter_version": service.engine.adapter_version}

    return app


def read_payload(body: bytes) -> tuple[dict[str, np.ndarray], dict]:
    try:
        return unpack(body)
    except ValueError as error:
        raise HTTPException(400, f"bad payload: {error}") from None


def answer_work_order(service: Service, rounds, arrays: dict[str, np.ndarray], header: dict) -> tuple[dict, dict]:
    """The round's reply, once the work order's nonce is on disk: the notice of its outcome must bring it back."""
    state, result = rounds.train_arrays(arrays, header)
    order = header["request"]
    if order.get("nonce"):
        service.orders.record(int(order["round_index"]), str(order["nonce"]))
    return state, result


def read_notice(header: dict, has_adapter: bool) -> tuple[int, bool | None, int | None]:
    """(round, accepted, version of the adapter it brings) of a round's notice; 400 if malformed."""
    try:
        round_index, accepted = int(header["round"]), header.get("accepted")
        version = int(header["version"]) if has_adapter else None
    except (KeyError, TypeError, ValueError) as error:
        raise HTTPException(400, f"bad round result: {error}") from None
    if not (accepted is None or isinstance(accepted, bool)):
        raise HTTPException(400, f"bad round result: accepted must be true, false or null, not {accepted!r}")
    return round_index, accepted, version


def check_nonce(service: Service, round_index: int, accepted: bool | None, nonce) -> None:
    """409 unless a notice that settles a round this device answered carries that work order's nonce."""
    expected = service.orders.nonce(round_index)
    if accepted is None or expected is None:
        return
    if not isinstance(nonce, str) or not hmac.compare_digest(nonce.encode(), expected.encode()):
        raise HTTPException(409, f"the notice of round {round_index} does not carry the nonce of the work order "
                                 "this device answered for that round")


# ---------------------------------------------------------------------------------------------- who may ask what

PEOPLE, SERVER = "people", "server"
OPEN_PATHS = {"/", "/health", "/docs", "/openapi.json", "/docs/oauth2-redirect"}
SAME_ORIGIN_FETCHES = {"same-origin", "none"}  # Sec-Fetch-Site of the page's own requests, and of an address typed
BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def route_role(path: str) -> str | None:
    """Whose token a path needs: PEOPLE, SERVER, or None for the open ones."""
    if path in OPEN_PATHS:
        return None
    return SERVER if path.startswith("/worker/") else PEOPLE


def credential(service: Service, authorization: str) -> str | None:
    """Whose token the request carries: PEOPLE, SERVER, or None (no token, or one that is neither)."""
    for role, token in ((PEOPLE, service.token), (SERVER, service.server_token)):
        if token is not None and hmac.compare_digest(authorization.encode(), f"Bearer {token}".encode()):
            return role
    return None


def refusal(service: Service, request: Request) -> JSONResponse | None:
    """The answer to a request no route may see (wrong host, another origin, wrong credential or body type), or None."""
    host = host_name(request.headers.get("host", ""))
    if host not in service.allowed_hosts:
        return JSONResponse({"detail": f"this device does not answer to the host name {host!r} "
                                       "(spearfl serve --allow-host NAME adds one)"}, 421)
    if cross_origin(request):
        return JSONResponse({"detail": "requests from another origin are refused: the page and the API serve their own"}, 403)
    path, role, presented = request.url.path, route_role(request.url.path), request.state.credential
    if role is not None and presented not in (None, role):
        return JSONResponse({"detail": f"the {presented}'s token does not reach {path}"}, 403)
    if role is not None and (service.token if role == PEOPLE else service.server_token) is not None and presented != role:
        return JSONResponse({"detail": f"missing or wrong {role}'s token (Authorization: Bearer <token>)"}, 401)
    wrong_type = unsupported_type(request)
    return None if wrong_type is None else JSONResponse({"detail": wrong_type}, 415)


def host_name(host: str) -> str:
    """The name in a Host header, without its port and an IPv6 address's brackets, in lower case."""
    if host.startswith("["):
        return host[1:host.find("]")].lower()
    return host.rpartition(":")[0].lower() if ":" in host else host.lower()


def cross_origin(request: Request) -> bool:
    """The browser says the request comes from a page of another origin (Origin, Sec-Fetch-Site)."""
    origin = request.headers.get("origin")
    if origin is not None and origin.lower() != f"{request.url.scheme}://{request.headers.get('host', '')}".lower():
        return True
    return request.headers.get("sec-fetch-site", "none") not in SAME_ORIGIN_FETCHES


def unsupported_type(request: Request) -> str | None:
    """Why the body's Content-Type is refused: JSON routes take application/json (a body-less POST needs none),
    /worker/* application/octet-stream; None when it is right."""
    path = request.url.path
    worker = path.startswith("/worker/")
    has_body = request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers
    if request.method not in BODY_METHODS or not (worker or has_body):
        return None
    expected = "application/octet-stream" if worker else "application/json"
    given = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    return None if given == expected else f"{path} takes {expected}, not {given or 'a body without a Content-Type'}"


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


