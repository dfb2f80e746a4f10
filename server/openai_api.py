"""The OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

Each request becomes one Job per choice (each prompt times n), with the request's sampling settings on top
of the server's; server.openai_replies runs them and shapes the response.
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from llama.batch_job import Job
from llama.chat_format import ROLES, Message
from llama.errors import UserError
from llama.sampling import Sampler
from server.errors import ApiError
from server.fields import SEED_LIMIT
from server.openai_replies import ChatReply, CompletionReply, respond
from server.openai_schema import (
    MAX_CHOICES,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    GenerationRequest,
)
from server.sampling_extras import (
    LogitBias,
    LogitsProcessor,
    PresenceFrequencyPenalty,
    make_sampler,
)
from server.state import ServerState, State

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the room left
SAMPLING_FIELDS = (
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "mirostat", "mirostat_tau", "mirostat_eta",
)

router = APIRouter(prefix="/v1")


def model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": state.started, "owned_by": "local"}


@router.get("/models")
async def list_models(state: State) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(state)]}


@router.get("/models/{model_id}")
async def get_model(model_id: str, state: State) -> dict[str, Any]:
    if model_id != state.model_name:
        raise ApiError(404, f"model '{model_id}' does not exist; this server has '{state.model_name}'",
                       param="model", code="model_not_found")
    return model_card(state)


# -- turning a request into jobs --------------------------------------------------------------------------


def make_request_sampler(req: GenerationRequest, state: ServerState, prompt_len: int, choice: int) -> Sampler:
    """The sampler of one choice. Unset fields keep the server's settings; a seed gives choice i seed + i
    (modulo 2**64, the seeds' range)."""
    overrides = {name: value for name in SAMPLING_FIELDS if (value := getattr(req, name)) is not None}
    seed = req.seed if req.seed is not None else state.engine.cfg.sampling.seed
    params = state.sampling(**overrides, seed=None if seed is None else (seed + choice) % SEED_LIMIT)
    processors: list[LogitsProcessor] = []
    if req.logit_bias:
        processors.append(LogitBias(parse_logit_bias(req.logit_bias, state.engine.tokenizer.vocab_size)))
    if req.presence_penalty or req.frequency_penalty:
        processors.append(PresenceFrequencyPenalty(req.presence_penalty, req.frequency_penalty))
    return make_sampler(params, processors, prompt_len)


def parse_logit_bias(bias: dict[str, float], vocab_size: int) -> dict[int, float]:
    parsed: dict[int, float] = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()) or int(key) >= vocab_size:  # not '²', which int() refuses
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
    else:  # several prompts: strings, or lists of token ids
        prompts = [tokenizer.encode(p, bos=True) if isinstance(p, str) else list(p) for p in prompt]  # type: ignore
    if not prompts:
        raise ApiError(400, "'prompt' is an empty list", param="prompt")
    for ids in prompts:
        bad = [i for i in ids if not 0 <= i < tokenizer.vocab_size]
        if bad:
            message = f"token id {bad[0]} in 'prompt' is outside the vocabulary (0..{tokenizer.vocab_size - 1})"
            raise ApiError(400, message, param="prompt")
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


# -- routes -----------------------------------------------------------------------------------------------


@router.post("/completions")
async def completions(req: CompletionRequest, request: Request, state: State) -> Any:
    req.reject_unsupported()
    reply = await run_in_threadpool(completion_reply, req, state)
    return await respond(state, reply, request, req.stream, req.include_usage())


def completion_reply(req: CompletionRequest, state: ServerState) -> CompletionReply:
    prompts = encode_prompts(req.prompt, state)
    if len(prompts) * req.n > MAX_CHOICES:
        raise ApiError(400, f"{len(prompts)} prompts times n={req.n} is more than {MAX_CHOICES} choices per request",
                       param="n")
    jobs = [
        Job(ids, make_request_sampler(req, state, len(ids), j),
            choose_max_tokens(req, state, len(ids), COMPLETION_DEFAULT_MAX_TOKENS), stop_strings=req.stop_strings())
        for ids in prompts for j in range(req.n)
    ]
    return CompletionReply(state.model_name, prompts, jobs)


@router.post("/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request, state: State) -> Any:
    req.reject_unsupported()
    reply = await run_in_threadpool(chat_reply, req, state)
    return await respond(state, reply, request, req.stream, req.include_usage())


def chat_reply(req: ChatCompletionRequest, state: ServerState) -> ChatReply:
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
    return ChatReply(state.model_name, [ids], jobs)
