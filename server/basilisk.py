"""The basilisk-compatible routes (/basilisk/...), for clients written against basilisk's small HTTP API.

Prompts are raw text, encoded without an automatic BOS: STX (\\x02) and ETX (\\x03) in the text become the
BOS and EOS ids in place (STX is dropped for models without a BOS), and with `special_convert` the literal
strings <s> and </s> are read as STX and ETX first. Each stretch of text between them is encoded on its
own, as chat formats encode turns.

/tokenize answers {tokens, fragments} for a prompt of at most MAX_TOKENIZE_TOKENS tokens.

/infer fields and their meaning here (unset sampling fields take the server's command-line settings; the
ranges that keep logits finite are in server.fields):
  temperature, top_k, top_p, min_p      as in llama.sampling; temperature 0 (greedy) or within [1e-6, 1e6]
  min_length (4)                        no stop token and no newline token before this many new tokens
  max_new_tokens (256, capped to the room left; an explicit value that does not fit is a 400)
  stopping_strings (["\\n"])            the reply ends before the first one it produces
  repetition_penalty, repetition_penalty_sustain, repetition_penalty_decay
                                        (also read as token_repetition_penalty_max/_sustain/_decay):
                                        see sampling_extras.DecayingRepetitionPenalty; defaults: the server's
                                        --repetition_penalty over its --repetition_window, decay 0; the
                                        penalty within [1e-6, 1e6], sustain and decay at most 2^20 tokens
  positional_repeat_inhibit ([]), positional_repetition_penalty (1.2; 0 turns it off, else within [1e-6, 1e6])
                                        see sampling_extras.PositionalRepetitionPenalty
The reply is {text, tokens}: the new text (cut before a stop string) and the new token ids.
"""
from __future__ import annotations

import re
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import AliasChoices, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, PlainTextResponse, Response

from llama.batch_job import Job
from llama.sampling import Sampler
from llama.tokenizer import StreamDecoder, Tokenizer
from server.errors import ApiError
from server.fields import Factor, RequestModel, TokenSpan, ZeroOrFactor, text_fields
from server.sampling_extras import (
    DecayingRepetitionPenalty,
    LogitsProcessor,
    PositionalRepetitionPenalty,
    SuppressTokens,
    make_sampler,
)
from server.state import ServerState, State

STX, ETX = "\x02", "\x03"
DEFAULT_MAX_NEW_TOKENS = 256
MAX_TOKENIZE_TOKENS = 1 << 17  # 131072, the longest context of the models served; fragments cost ~20 us each
PRIVATE_SETTINGS = {"model_dir", "tokenizer", "save_quantized", "ppl", "shared_secret"}  # never shown by /config

router = APIRouter(prefix="/basilisk")


class BasiliskRequest(RequestModel):
    model_config = ConfigDict(extra="ignore")


class TokenizeRequest(BasiliskRequest):
    prompt: str
    special_convert: bool = False

    _text = text_fields("prompt")


class InferRequest(BasiliskRequest):
    prompt: str
    temperature: ZeroOrFactor | None = None
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    min_p: float | None = Field(None, ge=0, le=1)
    min_length: int = Field(4, ge=0)
    max_new_tokens: int | None = Field(None, ge=1)
    stopping_strings: list[str] = ["\n"]
    repetition_penalty: Factor | None = Field(
        None, validation_alias=AliasChoices("repetition_penalty", "token_repetition_penalty_max")
    )
    repetition_penalty_sustain: TokenSpan | None = Field(
        None, ge=-1, validation_alias=AliasChoices("repetition_penalty_sustain", "token_repetition_penalty_sustain")
    )
    repetition_penalty_decay: TokenSpan = Field(
        0, ge=0, validation_alias=AliasChoices("repetition_penalty_decay", "token_repetition_penalty_decay")
    )
    positional_repeat_inhibit: list[list[int]] = []
    positional_repetition_penalty: ZeroOrFactor = 1.2
    special_convert: bool = False

    _text = text_fields("prompt", "stopping_strings")


def encode_prompt(text: str, tokenizer: Tokenizer, special_convert: bool) -> list[int]:
    """Token ids of a basilisk prompt: STX/ETX as BOS/EOS in place, the text between encoded piecewise."""
    if special_convert:
        text = text.replace("<s>", STX).replace("</s>", ETX)
    ids: list[int] = []
    for part in re.split(f"([{STX}{ETX}])", text):
        if part == STX:
            ids += [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        elif part == ETX:
            ids.append(tokenizer.eos_id)
        elif part:
            ids += tokenizer.encode(part)
    return ids


def fragments(ids: list[int], tokenizer: Tokenizer) -> list[str]:
    """The text each id adds; joined they equal tokenizer.decode(ids) (a character split over several
    byte tokens belongs to the token that completes it)."""
    decoder = StreamDecoder(tokenizer)
    out = [decoder.push(i) for i in ids]
    if out:
        out[-1] += decoder.flush()
    return out


def newline_ids(tokenizer: Tokenizer) -> set[int]:
    return {i for i in tokenizer.encode("\n") if tokenizer.decode([i]) == "\n"}


def public_settings(state: ServerState) -> dict[str, Any]:
    """The server's settings without paths or secrets, plus what the client may want to know of the model,
    and `batch`: the engine's load now (max_batch, running, queued, decode_tokens_per_s, decoded_tokens)."""
    engine = state.engine
    settings: dict[str, Any] = {}
    for f in fields(engine.cfg):
        value = getattr(engine.cfg, f.name)
        if f.name in PRIVATE_SETTINGS or isinstance(value, Path):
            continue
        if is_dataclass(value):
            value = asdict(value)  # type: ignore[arg-type]
        elif isinstance(value, tuple):
            value = list(value)
        settings[f.name] = value
    settings.update(
        model=state.model_name, ctx=state.ctx, vocab_size=engine.tokenizer.vocab_size,
        chat_format=engine.chat_format.name, device=str(engine.device), dtype=str(engine.dtype).removeprefix("torch."),
        max_batch=state.queue.decoder.max_batch, batch=state.queue.stats(),
    )
    return settings


@router.get("/ping", response_class=PlainTextResponse)
async def ping() -> str:
    return "pong"


@router.get("/config")
async def config(state: State) -> dict[str, Any]:
    return public_settings(state)


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, state: State) -> Response:
    return await run_in_threadpool(tokenize_reply, req, state)


def tokenize_reply(req: TokenizeRequest, state: ServerState) -> Response:
    """The /tokenize answer, rendered here (off the event loop): fragments cost a decode per token."""
    tokenizer = state.engine.tokenizer
    ids = encode_prompt(req.prompt, tokenizer, req.special_convert)
    if len(ids) > MAX_TOKENIZE_TOKENS:
        raise ApiError(400, f"the prompt is {len(ids)} tokens; this server tokenizes at most {MAX_TOKENIZE_TOKENS} "
                            "per request", param="prompt")
    return JSONResponse({"tokens": ids, "fragments": fragments(ids, tokenizer)})


@router.post("/infer")
async def infer(req: InferRequest, request: Request, state: State) -> dict[str, Any]:
    job = await run_in_threadpool(infer_job, req, state)
    async for _ in state.queue.stream(job, request.is_disconnected):
        pass
    reply: dict[str, Any] = {"text": job.result.text, "tokens": job.result.token_ids}
    if job.result.stats.speculative:
        reply["tokens_per_pass"] = job.result.stats.tokens_per_pass
    return reply


def infer_job(req: InferRequest, state: ServerState) -> Job:
    ids = encode_prompt(req.prompt, state.engine.tokenizer, req.special_convert)
    state.check_prompt(len(ids), "prompt")
    if req.max_new_tokens is None:
        max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, state.room(len(ids)))
    else:
        state.check_max_tokens(len(ids), req.max_new_tokens, "max_new_tokens")
        max_new_tokens = req.max_new_tokens
    return Job(ids, infer_sampler(req, state, len(ids)), max_new_tokens, stop_strings=req.stopping_strings)


def infer_sampler(req: InferRequest, state: ServerState, prompt_len: int) -> Sampler:
    base = state.engine.cfg.sampling
    tokenizer = state.engine.tokenizer
    overrides = {
        name: value for name in ("temperature", "top_k", "top_p", "min_p") if (value := getattr(req, name)) is not None
    }
    params = state.sampling(**overrides, repetition_penalty=1.0)  # the decaying penalty below replaces it
    penalty = base.repetition_penalty if req.repetition_penalty is None else req.repetition_penalty
    sustain = base.repetition_window if req.repetition_penalty_sustain is None else req.repetition_penalty_sustain
    processors: list[LogitsProcessor] = []
    if penalty != 1.0:
        processors.append(DecayingRepetitionPenalty(penalty, sustain, req.repetition_penalty_decay))
    if req.positional_repeat_inhibit and req.positional_repetition_penalty > 0:
        bad = [i for seq in req.positional_repeat_inhibit for i in seq if not 0 <= i < tokenizer.vocab_size]
        if bad:
            raise ApiError(400, f"positional_repeat_inhibit: token id {bad[0]} is outside the vocabulary",
                           param="positional_repeat_inhibit")
        processors.append(
            PositionalRepetitionPenalty.from_replies(req.positional_repeat_inhibit, req.positional_repetition_penalty)
        )
    if req.min_length > 0:
        suppressed = tokenizer.stop_ids | newline_ids(tokenizer)
        processors.append(SuppressTokens(tuple(sorted(suppressed)), req.min_length))
    return make_sampler(params, processors, prompt_len)


@router.post("/embed")
async def embed() -> None:
    raise ApiError(501, "embeddings are not available: no embedding model is configured on this server")
