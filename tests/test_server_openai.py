"""The OpenAI-compatible API over HTTP: the `openai` package and raw httpx against a real server."""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from server_harness import CTX, SECRET, build_server_engine, running_server

from engine.build import Engine
from llama.chat_format import Message
from llama.generation import Generation
from llama.sampling import Sampler

PROMPT = "The quick brown fox"
CHAT = [Message("user", "hello there")]
MAX_TOKENS = 12


@dataclass
class Served:
    url: str
    engine: Engine
    completion: Generation  # greedy reference for PROMPT, computed on the engine before serving
    chat: Generation  # greedy reference for CHAT

    def client(self, key: str = SECRET) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=30)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {SECRET}"}, timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    engine = build_server_engine(tmp_path_factory.mktemp("openai"))
    tok, fmt = engine.tokenizer, engine.chat_format
    completion = engine.generator.generate(tok.encode(PROMPT, bos=True), Sampler(engine.cfg.sampling), MAX_TOKENS)
    chat = engine.generator.generate(
        fmt.encode_dialog(CHAT), Sampler(engine.cfg.sampling), MAX_TOKENS, stop_ids=fmt.stop_ids | tok.stop_ids
    )
    with running_server(engine, SECRET) as url:
        yield Served(url, engine, completion, chat)


def sse_events(response: httpx.Response) -> list[str]:
    """The data payloads of a server-sent event stream, checking the framing on the way."""
    lines = list(response.iter_lines())
    events = [line for line in lines if line]
    assert all(line.startswith("data: ") for line in events), events
    assert lines[-1] == "" and all(lines[i] == "" for i in range(1, len(lines), 2))  # one blank line per event
    return [line.removeprefix("data: ") for line in events]


# -- the openai package -------------------------------------------------------------------------------


def test_models_lists_the_one_model(served: Served) -> None:
    models = served.client().models.list().data
    assert [m.id for m in models] == ["tiny-llama"]
    assert served.client().models.retrieve("tiny-llama").id == "tiny-llama"
    with pytest.raises(openai.NotFoundError):
        served.client().models.retrieve("gpt-4")


def test_completion_is_the_engines_greedy_text_with_usage(served: Served) -> None:
    reply = served.client().completions.create(model="any-name", prompt=PROMPT, max_tokens=MAX_TOKENS)
    ref = served.completion
    assert reply.model == "tiny-llama"
    assert reply.choices[0].text == ref.text
    assert reply.choices[0].finish_reason == ("length" if ref.stats.stop_reason == "length" else "stop")
    n_prompt = len(served.engine.tokenizer.encode(PROMPT, bos=True))
    assert reply.usage.prompt_tokens == n_prompt
    assert reply.usage.completion_tokens == ref.stats.new_tokens
    assert reply.usage.total_tokens == n_prompt + ref.stats.new_tokens


def test_completion_stream_joins_to_the_same_text(served: Served) -> None:
    stream = served.client().completions.create(
        model="m", prompt=PROMPT, max_tokens=MAX_TOKENS, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == served.completion.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("length", "stop") and not any(finishes[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == served.completion.stats.new_tokens


def test_chat_completion_and_its_stream_match_the_engine(served: Served) -> None:
    client = served.client()
    messages = [{"role": "user", "content": "hello there"}]
    reply = client.chat.completions.create(model="m", messages=messages, max_tokens=MAX_TOKENS)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == served.chat.text
    assert reply.usage.prompt_tokens == len(served.engine.chat_format.encode_dialog(CHAT))
    assert reply.usage.completion_tokens == served.chat.stats.new_tokens

    chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=MAX_TOKENS, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == served.chat.text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert all(c.usage is None for c in chunks)  # usage only when stream_options asks for it


def test_chat_accepts_text_parts_system_and_history(served: Served) -> None:
    reply = served.client().chat.completions.create(
        model="m", max_tokens=3,
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "how are you"},
        ],
    )
    assert reply.usage.completion_tokens <= 3 and reply.choices[0].finish_reason in ("length", "stop")


def test_stop_string_cuts_the_text(served: Served) -> None:
    ref = served.completion.text
    stop = next(c for c in ref[3:] if c.isascii() and c.isalnum())
    reply = served.client().completions.create(model="m", prompt=PROMPT, max_tokens=MAX_TOKENS, stop=[stop])
    assert reply.choices[0].text == ref[: ref.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_reproducible_and_n_gives_choices(served: Served) -> None:
    client = served.client()
    kwargs = {"model": "m", "prompt": PROMPT, "max_tokens": 10, "temperature": 1.0, "top_p": 1.0, "seed": 7, "n": 2}
    first = client.completions.create(**kwargs)
    second = client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    full = sum(c.finish_reason == "length" for c in first.choices)  # those ran all 10 tokens
    assert 10 * full <= first.usage.completion_tokens <= 20  # usage counts both choices
    extras = client.completions.create(
        model="m", prompt=PROMPT, max_tokens=5, extra_body={"top_k": 1, "min_p": 0.1, "repetition_penalty": 1.0,
                                                            "mirostat": 2}, temperature=0.9,
    )
    assert extras.usage.completion_tokens <= 5


def test_token_id_prompts_and_prompt_lists(served: Served) -> None:
    ids = served.engine.tokenizer.encode(PROMPT, bos=True)
    by_ids = served.client().completions.create(model="m", prompt=ids, max_tokens=MAX_TOKENS)
    assert by_ids.choices[0].text == served.completion.text
    both = served.client().completions.create(model="m", prompt=[PROMPT, "hello"], max_tokens=MAX_TOKENS)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].text == served.completion.text


# -- the wire format ----------------------------------------------------------------------------------


def test_sse_wire_format(served: Served) -> None:
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": True, "stream_options": {"include_usage": True}}
    with served.http() as http, http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] > 0
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == served.completion.text


def test_chat_sse_wire_format(served: Served) -> None:
    body = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": MAX_TOKENS, "stream": True}
    with served.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as response:
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] is not None


# -- errors -------------------------------------------------------------------------------------------

TOO_LONG = "the quick brown fox " * CTX


def raw(body: dict) -> bytes:
    """`body` as JSON bytes, with non-ASCII escaped: a lone surrogate travels as \\udXXX, as JSON allows."""
    return json.dumps(body).encode()



@pytest.mark.parametrize(
    "path, body, status, param, code, words",
    [
        ("/v1/completions", b"{not json", 400, None, None, "not valid JSON"),
        ("/v1/completions", b"[1, 2]", 400, None, None, "JSON object"),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": "ten"}, 400, "max_tokens", None, "valid integer"),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 2.5}, 400, "max_tokens", None, "integer"),
        ("/v1/completions", {"prompt": PROMPT, "temperature": 5}, 400, "temperature", None, "less than or equal"),
        ("/v1/completions", {"prompt": PROMPT, "stream": "yes"}, 400, "stream", None, "boolean"),
        ("/v1/completions", {"max_tokens": 3}, 400, "prompt", None, "missing"),
        ("/v1/completions", {"prompt": 12}, 400, "prompt", None, "expected one of str, list[str], list[int]"),
        ("/v1/completions", {"prompt": PROMPT, "stop": 5}, 400, "stop", None, "expected one of str, list[str]"),
        ("/v1/completions", {"prompt": TOO_LONG}, 400, "prompt", "context_length_exceeded", "context"),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": CTX}, 400, "max_tokens", "context_length_exceeded",
         "room"),
        ("/v1/completions", {"prompt": [CTX * 10]}, 400, "prompt", None, "vocabulary"),
        ("/v1/completions", {"prompt": PROMPT, "logprobs": 3}, 400, "logprobs", None, "not supported"),
        ("/v1/completions", {"prompt": PROMPT, "logit_bias": {"x": 1}}, 400, "logit_bias", None, "token id"),
        ("/v1/completions", raw({"prompt": "a\ud800b"}), 400, "prompt", None, "lone UTF-16 surrogate (\\ud800)"),
        ("/v1/completions", raw({"prompt": ["ok", "\udfff"]}), 400, "prompt", None, "surrogate"),
        ("/v1/completions", raw({"prompt": PROMPT, "stop": ["\udc00"]}), 400, "stop", None, "surrogate"),
        ("/v1/completions", {"prompt": PROMPT, "seed": 2**64}, 400, "seed", None, "less than"),
        ("/v1/completions", {"prompt": PROMPT, "temperature": 1e-40}, 400, "temperature", None, "within [1e-06"),
        ("/v1/completions", {"prompt": PROMPT, "repetition_penalty": 1e300}, 400, "repetition_penalty", None,
         "less than or equal"),
        ("/v1/completions", raw({"prompt": PROMPT, "temperature": float("inf")}), 400, "temperature", None, "finite"),
        ("/v1/completions", {"prompt": PROMPT, "logit_bias": {"\u00b2": 1}}, 400, "logit_bias", None, "token id"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages", None, "at least 1"),
        ("/v1/chat/completions", raw({"messages": [{"role": "user", "content": "\ud800"}]}), 400,
         "messages.0.content", None, "surrogate"),
        ("/v1/chat/completions", raw({"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}),
         400, "messages.0.content.0.text", None, "surrogate"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": TOO_LONG}]}, 400, "messages",
         "context_length_exceeded", "context"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
         "messages.0.content", None, "image_url"),
        ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages", None,
         "user"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
         400, "tools", None, "not supported"),
        ("/v1/nowhere", {}, 404, None, None, "no route"),
    ],
)
def test_bad_requests_get_openai_errors(served: Served, path, body, status, param, code, words) -> None:
    with served.http() as http:
        if isinstance(body, bytes):
            response = http.post(path, content=body, headers={"Content-Type": "application/json"})
        else:
            response = http.post(path, json=body)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
        assert error["param"] == param and error["code"] == code
        assert words in error["message"]
        # the server keeps serving
        assert http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200


def test_openai_client_raises_bad_request(served: Served) -> None:
    with pytest.raises(openai.BadRequestError, match="context"):
        served.client().completions.create(model="m", prompt=PROMPT, max_tokens=10 * CTX)


def test_wrong_method_is_405(served: Served) -> None:
    with served.http() as http:
        response = http.get("/v1/completions")
    assert response.status_code == 405 and "error" in response.json()


# -- auth ---------------------------------------------------------------------------------------------


def test_auth_missing_or_wrong_key_is_401_with_openais_error_body(served: Served) -> None:
    with pytest.raises(openai.AuthenticationError):
        served.client(key="wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        served.client(key=SECRET + "x").completions.create(model="m", prompt=PROMPT, max_tokens=1)
    url = served.url + "/v1/completions"
    refused = {
        "missing": httpx.post(url, json={"prompt": PROMPT}),
        "wrong": httpx.post(url, json={"prompt": PROMPT}, headers={"Authorization": "Bearer x"}),
        "basilisk style, no Bearer": httpx.post(url, json={"prompt": PROMPT}, headers={"Authorization": SECRET}),
        "wrong, body malformed": httpx.post(url, content=b"{", headers={"Authorization": "Bearer x"}),  # not read
    }
    for case, response in refused.items():
        assert response.status_code == 401, case
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key", case
        assert set(error) == {"message", "type", "param", "code"} and error["param"] is None, case
    assert refused["wrong"].json()["error"]["message"] == "incorrect API key"
