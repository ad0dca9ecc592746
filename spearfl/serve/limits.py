"""What one request to the device service may hold, how many may wait, and the middleware that enforces the body size."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """What one request may hold (beyond it the service answers 413 or 422 and stores nothing), how many answers may
    wait for the model at once (beyond that 503, with Retry-After) and how many one person may ask for a minute
    (beyond that 429, with Retry-After)."""

    max_body_bytes: int = 64 * 1024
    max_question_chars: int = 4000
    max_option_chars: int = 500
    max_options: int = 26
    max_hint_chars: int = 1000
    max_prompt_tokens: int = 1024
    max_person_chars: int = 100
    max_adapter_bytes: int = 1 << 30  # a work order carries the global adapter
    max_waiting_requests: int = 64  # four full batches of the engine's default 16
    # answers (asking, revising, chat completions) one person may start in any 60 seconds (beyond that 429, with
    # Retry-After); a request that names no person counts as the unnamed one's. Two a second: more than a person
    # types, less than a script that floods the engine for everyone else.
    answers_per_minute: int = 120


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
