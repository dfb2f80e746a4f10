"""How OpenAI responses look, in full and as server-sent events, for completions and chat completions.

Without `stream`, a request's choices decode together in the engine's batch; with `stream: true` they run
one after another, and the reply is `data: {chunk}` per text piece, a last chunk with the finish_reason per
choice, a usage chunk when `stream_options.include_usage` is set, then `data: [DONE]`. An error after the
stream has started (a failed generation, or the server shutting down) is sent as a `data: {"error": ...}`
event, which OpenAI's clients raise.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from starlette.responses import StreamingResponse

from llama.batch_job import Job
from server.errors import ApiError, openai_error_body
from server.state import ServerState


def finish_reason(job: Job) -> str:
    return "length" if job.result.stats.stop_reason == "length" else "stop"


class ReplyFormat(ABC):
    """One response: its id and timestamps, and how its choices render in full and as stream chunks."""

    id_prefix: str
    object_name: str
    chunk_object_name: str

    def __init__(self, model: str, prompts: list[list[int]], jobs: list[Job]) -> None:
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.prompts = prompts
        self.jobs = jobs

    def usage(self) -> dict[str, int | float]:
        prompt_tokens = sum(len(p) for p in self.prompts)
        completion_tokens = sum(job.result.stats.new_tokens for job in self.jobs)
        usage: dict[str, int | float] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                         "total_tokens": prompt_tokens + completion_tokens}
        stats = [job.result.stats for job in self.jobs if job.result.stats.speculative]
        if stats:  # mean tokens per target pass over the choices' decode passes
            decoded = sum(max(s.new_tokens - 1, 0) for s in stats)
            usage["tokens_per_target_pass"] = decoded / max(sum(s.decode_passes for s in stats), 1)
        return usage

    def envelope(self, object_name: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def full(self) -> dict[str, Any]:
        choices = [self.choice(i, job) for i, job in enumerate(self.jobs)]
        return self.envelope(self.object_name, choices, usage=self.usage())

    def chunk(self, choice: dict[str, Any]) -> str:
        return sse(self.envelope(self.chunk_object_name, [choice]))

    @abstractmethod
    def choice(self, i: int, job: Job) -> dict[str, Any]:
        """Choice i of the full response."""

    def opening(self, i: int) -> dict[str, Any] | None:
        """The chunk choice that opens choice i of a stream, if the format has one."""
        return None

    @abstractmethod
    def piece(self, i: int, text: str, finish: str | None) -> dict[str, Any]:
        """The chunk choice carrying `text` of choice i (the last one: '' and its finish reason)."""


class CompletionReply(ReplyFormat):
    id_prefix = "cmpl"
    object_name = chunk_object_name = "text_completion"

    def choice(self, i: int, job: Job) -> dict[str, Any]:
        return {"index": i, "text": job.result.text, "logprobs": None, "finish_reason": finish_reason(job)}

    def piece(self, i: int, text: str, finish: str | None) -> dict[str, Any]:
        return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}


class ChatReply(ReplyFormat):
    id_prefix = "chatcmpl"
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def choice(self, i: int, job: Job) -> dict[str, Any]:
        message = {"role": "assistant", "content": job.result.text}
        return {"index": i, "message": message, "logprobs": None, "finish_reason": finish_reason(job)}

    def opening(self, i: int) -> dict[str, Any] | None:
        return {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def piece(self, i: int, text: str, finish: str | None) -> dict[str, Any]:
        delta = {"content": text} if finish is None else {}
        return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_events(
    state: ServerState, reply: ReplyFormat, request: Request, with_usage: bool
) -> AsyncIterator[str]:
    try:
        for i, job in enumerate(reply.jobs):
            opening = reply.opening(i)
            if opening is not None:
                yield reply.chunk(opening)
            async for text in state.queue.stream(job, request.is_disconnected):
                yield reply.chunk(reply.piece(i, text, None))
            yield reply.chunk(reply.piece(i, "", finish_reason(job)))
        if with_usage:
            yield sse(reply.envelope(reply.chunk_object_name, [], usage=reply.usage()))
        yield "data: [DONE]\n\n"
    except ApiError as e:  # the headers are sent: report it in-band, as OpenAI does
        yield sse(openai_error_body(e))
    except Exception as e:  # noqa: BLE001 (the same for any failure)
        yield sse(openai_error_body(ApiError(500, f"generation failed: {type(e).__name__}: {e}")))


async def respond(state: ServerState, reply: ReplyFormat, request: Request, stream: bool, with_usage: bool) -> Any:
    """Run the reply's jobs; answer as one JSON object, or as an event stream while they run."""
    if stream:
        return StreamingResponse(
            stream_events(state, reply, request, with_usage), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    await asyncio.gather(*(_drain(state, job, request) for job in reply.jobs))
    return reply.full()


async def _drain(state: ServerState, job: Job, request: Request) -> None:
    async for _ in state.queue.stream(job, request.is_disconnected):
        pass
