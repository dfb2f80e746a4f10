"""The OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

Every choice (each prompt times n) is one Job through the engine queue, run in order. With `stream: true`
the reply is server-sent events: `data: {chunk}` per text piece, a last chunk with the finish_reason per
choice, a usage chunk when `stream_options.include_usage` is set, then `data: [DONE]`. An error after the
stream has started is sent as a `data: {"error": ...}` event, which OpenAI's clients raise.
"""
from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import StreamingResponse

from llama.chat_format import ROLES, Message
from llama.errors import UserError
from llama.sampling import Sampler
from server.errors import ApiError, openai_error_body
from server.openai_schema import (
    MAX_CHOICES, ChatCompletionRequest, ChatMessage, CompletionRequest, GenerationRequest,
)
from server.queue import Job
from server.sampling_extras import LogitBias, LogitsProcessor, PresenceFrequencyPenalty, make_sampler
from server.state import ServerState, server_state

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the room left
SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "mirostat", "mirostat_tau", "mirostat_eta",
)

router = APIRouter(prefix="/v1")


def model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": state.started, "owned_by": "local"}


@router.get("/models")
async def list_models(state: ServerState = Depends(server_state)) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(state)]}


@router.get("/models/{model_id}")
async def get_model(model_id: str, state: ServerState = Depends(server_state)) -> dict[str, Any]:
    if model_id != state.model_name:
        raise ApiError(404, f"model '{model_id}' does not exist; this server has '{state.model_name}'",
                       param="model", code="model_not_found")
    return model_card(state)


# -- turning a request into jobs --------------------------------------------------------------------------


def make_request_sampler(req: GenerationRequest, state: ServerState, prompt_len: int, choice: int) -> Sampler:
    """The sampler of one choice. Unset fields keep the server's settings; a seed gives choice i seed + i."""
    base = state.engine.cfg.sampling
    overrides = {name: value for name in SAMPLING_FIELDS if (value := getattr(req, name)) is not None}
    seed = req.seed if req.seed is not None else base.seed
    try:
        params = replace(base, **overrides, seed=None if seed is None else seed + choice)
    except UserError as e:
        raise ApiError(400, str(e).replace("--", "", 1)) from None
    processors: list[LogitsProcessor] = []
    if req.logit_bias:
        processors.append(LogitBias(parse_logit_bias(req.logit_bias, state.engine.tokenizer.vocab_size)))
    if req.presence_penalty or req.frequency_penalty:
        processors.append(PresenceFrequencyPenalty(req.presence_penalty, req.frequency_penalty))
    return make_sampler(params, processors, prompt_len)


def parse_logit_bias(bias: dict[str, float], vocab_size: int) -> dict[int, float]:
    parsed: dict[int, float] = {}
    for key, value in bias.items():
        if not key.isdigit() or int(key) >= vocab_size:
            raise ApiError(400, f"logit_bias key {key!r} is not a token id below {vocab_size}", param="logit_bias")
        if not -100 <= value <= 100:
            raise ApiError(400, f"logit_bias value {value} for {key} is outside [-100, 100]", param="logit_bias")
        parsed[int(key)] = value
    return parsed


def choose_max_tokens(req: GenerationRequest, state: ServerState, n_prompt: int, default: int | None) -> int:
    """The request's max_tokens (refused if it does not fit), else `default` (None: all the room left)."""
    requested = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if requested is None:
        return state.room(n_prompt) if default is None else min(default, state.room(n_prompt))
    param = "max_tokens" if req.max_tokens is not None else "max_completion_tokens"
    state.check_max_tokens(n_prompt, requested, param)
    return requested


def encode_prompts(prompt: str | list[str] | list[int] | list[list[int]], state: ServerState) -> list[list[int]]:
    tokenizer = state.engine.tokenizer
    if isinstance(prompt, str):
        prompts = [tokenizer.encode(prompt, bos=True)]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]  # type: ignore[arg-type]
    else:
        prompts = [tokenizer.encode(p, bos=True) if isinstance(p, str) else list(p) for p in prompt]  # type: ignore[union-attr]
    if not prompts:
        raise ApiError(400, "'prompt' is an empty list", param="prompt")
    for ids in prompts:
        bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} in 'prompt' is outside the vocabulary (0..{tokenizer.vocab_size - 1})",
                           param="prompt")
        state.check_prompt(len(ids), "prompt")
    return prompts


def chat_messages(messages: list[ChatMessage]) -> list[Message]:
    """OpenAI messages as chat-format Messages: text parts joined, 'developer' read as 'system'."""
    out = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role {m.role!r} is not supported (use {', '.join(ROLES)})",
                           param=f"messages.{i}.role")
        if isinstance(m.content, list):
            other = [p.type for p in m.content if p.type != "text"]
            if other:
                raise ApiError(400, f"messages[{i}]: content parts of type {other[0]!r} are not supported",
                               param=f"messages.{i}.content")
            content = "".join(p.text or "" for p in m.content)
        else:
            content = m.content or ""
        out.append(Message(role, content))
    return out


# -- responses --------------------------------------------------------------------------------------------


def finish_reason(job: Job) -> str:
    return "length" if job.result.stats.stop_reason == "length" else "stop"


def usage(prompts: list[list[int]], jobs: list[Job]) -> dict[str, int]:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(job.result.stats.new_tokens for job in jobs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class Reply:
    """What a response needs besides the jobs: its id, object names and how a choice is rendered."""

    id: str
    object: str  # of the full response; streamed chunks use `chunk_object`
    chunk_object: str
    model: str
    choice: Callable[[int, Job], dict[str, Any]]  # full response: choice i
    delta: Callable[[int, str | None, str | None], dict[str, Any]]  # stream: (i, text or None, finish) -> choice
    created: int = 0

    def __post_init__(self) -> None:
        self.created = int(time.time())

    def envelope(self, obj: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}


async def run_jobs(state: ServerState, jobs: list[Job], request: Request) -> None:
    for job in jobs:
        async for _ in state.queue.stream(job, request.is_disconnected):
            pass


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_events(
    state: ServerState, reply: Reply, prompts: list[list[int]], jobs: list[Job], request: Request, with_usage: bool,
) -> AsyncIterator[str]:
    try:
        for i, job in enumerate(jobs):
            opening = reply.delta(i, None, None)
            if opening:
                yield sse(reply.envelope(reply.chunk_object, [opening]))
            async for piece in state.queue.stream(job, request.is_disconnected):
                yield sse(reply.envelope(reply.chunk_object, [reply.delta(i, piece, None)]))
            yield sse(reply.envelope(reply.chunk_object, [reply.delta(i, "", finish_reason(job))]))
        if with_usage:
            yield sse(reply.envelope(reply.chunk_object, [], usage=usage(prompts, jobs)))
        yield "data: [DONE]\n\n"
    except Exception as e:  # headers are sent: report in-band, as OpenAI does
        yield sse(openai_error_body(ApiError(500, f"generation failed: {type(e).__name__}: {e}")))


async def respond(
    state: ServerState, reply: Reply, prompts: list[list[int]], jobs: list[Job], req: GenerationRequest,
    request: Request,
) -> Any:
    if req.stream:
        events = stream_events(state, reply, prompts, jobs, request, req.include_usage())
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await run_jobs(state, jobs, request)
    choices = [reply.choice(i, job) for i, job in enumerate(jobs)]
    return reply.envelope(reply.object, choices, usage=usage(prompts, jobs))


# -- routes -----------------------------------------------------------------------------------------------


@router.post("/completions")
async def completions(
    req: CompletionRequest, request: Request, state: ServerState = Depends(server_state)
) -> Any:
    req.reject_unsupported()
    prompts = encode_prompts(req.prompt, state)
    if len(prompts) * req.n > MAX_CHOICES:
        raise ApiError(400, f"{len(prompts)} prompts times n={req.n} is more than {MAX_CHOICES} choices per request",
                       param="n")
    jobs = [
        Job(ids, make_request_sampler(req, state, len(ids), j),
            choose_max_tokens(req, state, len(ids), COMPLETION_DEFAULT_MAX_TOKENS), stop_strings=req.stop_strings())
        for ids in prompts for j in range(req.n)
    ]

    def choice(i: int, job: Job) -> dict[str, Any]:
        return {"index": i, "text": job.result.text, "logprobs": None, "finish_reason": finish_reason(job)}

    def delta(i: int, text: str | None, finish: str | None) -> dict[str, Any]:
        if text is None:
            return {}  # completions streams have no opening chunk
        return {"index": i, "text": text, "logprobs": None, "finish_reason": finish}

    reply = Reply(f"cmpl-{uuid.uuid4().hex}", "text_completion", "text_completion", state.model_name, choice, delta)
    return await respond(state, reply, prompts, jobs, req, request)


@router.post("/chat/completions")
async def chat_completions(
    req: ChatCompletionRequest, request: Request, state: ServerState = Depends(server_state)
) -> Any:
    req.reject_unsupported()
    engine = state.engine
    try:
        ids = engine.chat_format.encode_dialog(chat_messages(req.messages))
    except UserError as e:
        raise ApiError(400, str(e), param="messages") from None
    state.check_prompt(len(ids), "messages")
    max_tokens = choose_max_tokens(req, state, len(ids), None)
    stop_ids = engine.chat_format.stop_ids | engine.tokenizer.stop_ids
    jobs = [
        Job(ids, make_request_sampler(req, state, len(ids), j), max_tokens, stop_ids, req.stop_strings())
        for j in range(req.n)
    ]

    def choice(i: int, job: Job) -> dict[str, Any]:
        message = {"role": "assistant", "content": job.result.text}
        return {"index": i, "message": message, "logprobs": None, "finish_reason": finish_reason(job)}

    def delta(i: int, text: str | None, finish: str | None) -> dict[str, Any]:
        if text is None:
            content: dict[str, Any] = {"role": "assistant", "content": ""}
        else:
            content = {"content": text} if finish is None else {}
        return {"index": i, "delta": content, "logprobs": None, "finish_reason": finish}

    reply = Reply(f"chatcmpl-{uuid.uuid4().hex}", "chat.completion", "chat.completion.chunk", state.model_name,
                  choice, delta)
    return await respond(state, reply, [ids], jobs, req, request)
