"""The OpenAI-compatible chat completion: its request body, its reply, and its streaming chunks.

The device answers the last user message as a question (with `options`, spearfl's own field, a multiple-choice
one) and stores it like an answer from `/ask`; the reply carries `interaction_id` and `adapter_version`, so a
client can give its verdict next.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from spearfl.serve.engine import request_seed
from spearfl.serve.limits import Limits
from spearfl.serve.service import Service
from spearfl.serve.streaming import events


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

    replies = events(service, prompt_ids, request_seed(completion_id))

    async def stream():
        yield chunk({"role": "assistant", "content": service.prompts.prefix})
        async for kind, value in replies:
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
