"""Request bodies of the OpenAI-compatible API, validated strictly (a wrong JSON type is a 400, not coerced).

Unknown fields are ignored, as most OpenAI-compatible servers do; fields this server knows but cannot
honour (logprobs, tools, ...) are refused with a 400 when set to anything but their neutral value.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field

from server.errors import ApiError
from server.fields import Factor, RequestModel, Seed, ZeroOrFactor, text_fields

MAX_CHOICES = 64  # choices (prompts times n) per request: each one is a full generation
MAX_STOP_STRINGS = 16


class StrictModel(RequestModel):
    model_config = ConfigDict(extra="allow")

    # field name -> values that mean "not used"; anything else is refused
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {}

    def reject_unsupported(self) -> None:
        for name, neutral in self.UNSUPPORTED.items():
            value = (self.model_extra or {}).get(name)
            if not any(value == n and type(value) is type(n) for n in neutral):
                raise ApiError(400, f"'{name}' is not supported by this server", param=name)


class StreamOptions(StrictModel):
    include_usage: bool = False


class GenerationRequest(StrictModel):
    """Fields common to /v1/completions and /v1/chat/completions. Unset sampling fields take the server's
    command-line settings; top_k, min_p, repetition_penalty and mirostat* are extensions to OpenAI's API."""

    model: str | None = None  # any name is accepted: this server has one model, named in the response
    max_tokens: int | None = Field(None, ge=1)
    temperature: ZeroOrFactor | None = Field(None, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, max_length=MAX_STOP_STRINGS)
    seed: Seed | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: Factor | None = None
    mirostat: Literal[0, 1, 2] | None = None
    mirostat_tau: float | None = Field(None, gt=0)
    mirostat_eta: float | None = Field(None, gt=0)

    _text = text_fields("stop")

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]

    _prompt_text = text_fields("prompt")

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "logprobs": (None, False, 0),
        "echo": (None, False),
        "suffix": (None, ""),
        "best_of": (None, 1),
    }


class ContentPart(StrictModel):
    type: str
    text: str | None = None

    _text = text_fields("text")


class ChatMessage(StrictModel):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None

    _text = text_fields("content")


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "logprobs": (None, False),
        "top_logprobs": (None, 0),
        "tools": (None, []),
        "tool_choice": (None, "none"),
        "functions": (None, []),
        "function_call": (None, "none"),
        "response_format": (None, {"type": "text"}),
    }
