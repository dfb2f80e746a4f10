"""One request never stops the others: pings are answered while any route tokenizes, too large bodies and
prompts are refused early. (The ping under a real large request is in test_server_cli: the test's own
client would share the server's GIL here.)"""
from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from server_harness import PING_BOUND_S, build_server_engine, ping, running_server

from llama.tokenizer import Tokenizer
from server.basilisk import MAX_TOKENIZE_TOKENS

MARKER = "tokenize me slowly: "
MAX_BODY = 2**20
SENTENCE = "the quick brown fox jumps over the lazy dog 12345 "


class SignallingTokenizer:
    """Wraps a Tokenizer: encoding a text that holds MARKER sets `entered`, then waits for `release`
    (set unless a test holds it), so a test knows when that request's CPU work is in progress."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode(self, text: str, *args: Any, **kwargs: Any) -> list[int]:
        if MARKER in text:
            self.entered.set()
            assert self.release.wait(timeout=60), "the test never released the tokenizer"
        return self.inner.encode(text, *args, **kwargs)


@dataclass
class Served:
    url: str
    tokenizer: SignallingTokenizer


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    engine = build_server_engine(tmp_path_factory.mktemp("liveness"), max_body=MAX_BODY)
    tokenizer = SignallingTokenizer(engine.tokenizer)
    engine.tokenizer = engine.chat_format.tokenizer = tokenizer  # type: ignore[assignment]
    with running_server(engine) as url:
        yield Served(url, tokenizer)


@pytest.fixture
def tokenizer(served: Served) -> Iterator[SignallingTokenizer]:
    served.tokenizer.entered.clear()
    yield served.tokenizer
    served.tokenizer.release.set()


ROUTES = {
    "tokenize": ("/basilisk/tokenize", {"prompt": MARKER + "hello"}),
    "infer": ("/basilisk/infer", {"prompt": MARKER + "hello", "max_new_tokens": 2}),
    "completions": ("/v1/completions", {"prompt": MARKER + "hello", "max_tokens": 2}),
    "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": MARKER + "hello"}], "max_tokens": 2}),
}


@pytest.mark.parametrize("route", ROUTES)
def test_ping_is_answered_while_a_request_is_tokenized(served: Served, tokenizer: SignallingTokenizer, route) -> None:
    path, body = ROUTES[route]
    tokenizer.release.clear()  # the request's tokenizing lasts until the ping is back
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=served.url) as http:
        held = pool.submit(httpx.post, served.url + path, json=body, timeout=60)
        try:
            assert tokenizer.entered.wait(timeout=30)
            waited = ping(http)
            assert not held.done()
        finally:
            tokenizer.release.set()
        assert held.result().status_code == 200
    assert waited < PING_BOUND_S


def test_tokenize_refuses_more_tokens_than_its_cap(served: Served) -> None:
    text = SENTENCE * (2 * MAX_TOKENIZE_TOKENS // len(served.tokenizer.inner.encode(SENTENCE)))
    response = httpx.post(served.url + "/basilisk/tokenize", json={"prompt": text}, timeout=60)
    assert response.status_code == 400 and f"at most {MAX_TOKENIZE_TOKENS}" in response.text


def padded(body: dict[str, Any], size: int) -> bytes:
    """`body` as JSON, padded with spaces to `size` bytes (still the same JSON)."""
    raw = json.dumps(body).encode()
    return raw + b" " * (size - len(raw))


@pytest.mark.parametrize("path", ["/basilisk/tokenize", "/v1/completions"])
def test_bodies_over_the_cap_are_413_before_they_are_read(served: Served, path) -> None:
    body = {"prompt": "hello", "max_tokens": 1}
    over = padded(body, MAX_BODY + 1)
    with httpx.Client(base_url=served.url, headers={"Content-Type": "application/json"}, timeout=30) as http:
        at_cap = http.post(path, content=padded(body, MAX_BODY))
        declared = http.post(path, content=over)
        chunked = http.post(path, content=(over[i : i + 65536] for i in range(0, len(over), 65536)))  # no length
    assert at_cap.status_code == 200
    for response in (declared, chunked):
        assert response.status_code == 413
        message = response.json()["error"]["message"] if path.startswith("/v1") else response.text
        assert f"larger than {MAX_BODY} bytes" in message
