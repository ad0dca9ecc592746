"""From the answering engine to HTTP: a request's events on the caller's event loop, as server-sent events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from fastapi import HTTPException
from fastapi.responses import StreamingResponse

from spearfl.data.store import StoreError
from spearfl.serve.service import Service


def events(service: Service, prompt_ids: list[int], seed: int) -> AsyncIterator[tuple[str, object]]:
    """The engine's events for one request, as an async iterator on the caller's event loop. The request is queued
    now (503 if the queue is full), so call this before a response starts; its place is freed when the engine
    finishes it, whether or not anyone still reads."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    service.admit()

    def on_event(kind: str, value: object) -> None:
        if kind != "token":
            service.finished()
        loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

    service.engine.submit(prompt_ids, seed, on_event)

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
    replies = events(service, prompt_ids, seed)

    async def stream():
        prefix = service.prompts.prefix
        if prefix:  # the reply's opening the prompt already wrote (prompt.answer_prefix): shown, not generated
            yield sse("token", {"text": prefix, "prefix": True})
        async for kind, value in replies:
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
