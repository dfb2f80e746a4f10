"""The engine queue over HTTP: fair order, clients that leave mid-generation, and a bounded load test."""
from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from server_harness import CTX, SECRET, build_server_engine, running_server, wait_until

from llama.generation import Generation, Generator

OPENAI_AUTH = {"Authorization": f"Bearer {SECRET}"}
BASILISK_AUTH = {"Authorization": SECRET}


class RecordingGenerator:
    """Wraps the engine's Generator: records each request's prompt and result, can slow it down, and can
    hold a generation at its start until `go` is set."""

    def __init__(self, inner: Generator) -> None:
        self.inner = inner
        self.delay = 0.0  # seconds of sleep after each streamed piece
        self.go = threading.Event()
        self.go.set()
        self.runs: list[tuple[list[int], Generation]] = []
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def stream(self, prompt: list[int], *args: Any, result: Generation, **kwargs: Any) -> Iterator[str]:
        with self._lock:
            self.runs.append((prompt, result))
        assert self.go.wait(timeout=60), "the test never let the generation go"
        for piece in self.inner.stream(prompt, *args, result=result, **kwargs):
            time.sleep(self.delay)
            yield piece


@dataclass
class Served:
    url: str
    recorder: RecordingGenerator


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    engine = build_server_engine(tmp_path_factory.mktemp("load"))
    recorder = RecordingGenerator(engine.generator)
    engine.generator = recorder  # type: ignore[assignment]
    with running_server(engine, SECRET) as url:
        yield Served(url, recorder)


@pytest.fixture
def slow(served: Served) -> Iterator[Served]:
    served.recorder.delay = 0.02
    served.recorder.runs.clear()
    yield served
    served.recorder.delay = 0.0


def long_request(prompt: str, stream: bool) -> dict[str, Any]:
    """A completion as long as the context allows: about CTX * 0.02 s = 5 s when slowed."""
    return {"prompt": prompt, "max_tokens": CTX - 16, "temperature": 0.0, "stream": stream,
            "logit_bias": {"2": -100}}  # never EOS: it must run its full length unless stopped


def test_client_leaving_mid_stream_frees_the_engine(slow: Served) -> None:
    with httpx.Client(base_url=slow.url, headers=OPENAI_AUTH, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=long_request("one", stream=True)) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line)
            assert first.startswith("data: ")
        # the stream is closed: the connection drops with most of the reply not generated
        start = time.monotonic()
        after = http.post("/v1/completions", json={"prompt": "two", "max_tokens": 2})
        waited = time.monotonic() - start
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 2
    assert waited < 2.5  # far less than the ~5 s the abandoned reply would have taken
    abandoned = slow.recorder.runs[0][1].stats
    assert abandoned.stop_reason == "interrupted" and abandoned.new_tokens < CTX // 2


def test_client_timing_out_on_a_plain_request_frees_the_engine(slow: Served) -> None:
    with httpx.Client(base_url=slow.url, headers=OPENAI_AUTH) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=long_request("one", stream=False), timeout=0.5)
        after = http.post("/v1/completions", json={"prompt": "two", "max_tokens": 2}, timeout=2.5)
    assert after.status_code == 200
    abandoned = slow.recorder.runs[0][1].stats
    assert abandoned.stop_reason == "interrupted" and abandoned.new_tokens < CTX // 2


def test_queued_requests_are_served_in_arrival_order(served: Served) -> None:
    served.recorder.runs.clear()
    served.recorder.go.clear()  # request 0 holds the engine until all the others wait in line

    def send(i: int) -> httpx.Response:
        body = {"prompt": f"request {i}", "max_tokens": 3}
        return httpx.post(served.url + "/v1/completions", json=body, headers=OPENAI_AUTH, timeout=60)

    with ThreadPoolExecutor(6) as pool, httpx.Client(base_url=served.url) as http:
        try:
            sent = [pool.submit(send, 0)]
            wait_until(lambda: len(served.recorder.runs) == 1, "request 0 holds the engine")
            for i in range(1, 6):  # each one is sent once the one before it waits in line
                sent.append(pool.submit(send, i))
                wait_until(lambda: http.get("/health").json()["queued"] == i, f"request {i} waits its turn")
        finally:
            served.recorder.go.set()
        assert all(f.result().status_code == 200 for f in sent)
    tokenizer = served.recorder.inner.tokenizer
    assert [prompt for prompt, _ in served.recorder.runs] == [tokenizer.encode(f"request {i}", bos=True) for i in range(6)]


def test_health_answers_without_the_secret(served: Served) -> None:
    assert httpx.get(served.url + "/health").json() == {"status": "ok", "queued": 0}


# -- load -------------------------------------------------------------------------------------------------


def one_request(http: httpx.Client, kind: str, rng: random.Random) -> tuple[str, bool]:
    """Send one request of `kind`; return (kind, whether the answer was what that kind must get)."""
    n = rng.randint(1, 4)
    if kind == "completion":
        r = http.post("/v1/completions", json={"prompt": "the cat", "max_tokens": n, "temperature": 0.7},
                      headers=OPENAI_AUTH)
        return kind, r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= n
    if kind == "chat":
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": n, "seed": n}
        r = http.post("/v1/chat/completions", json=body, headers=OPENAI_AUTH)
        return kind, r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    if kind in ("completion_stream", "chat_stream"):
        path, body = (
            ("/v1/completions", {"prompt": "the fox"}) if kind == "completion_stream"
            else ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        )
        body.update(max_tokens=n, stream=True)
        with http.stream("POST", path, json=body, headers=OPENAI_AUTH) as r:
            events = [line for line in r.iter_lines() if line]
        return kind, r.status_code == 200 and events[-1] == "data: [DONE]" and all(
            "choices" in json.loads(e.removeprefix("data: ")) for e in events[:-1]
        )
    if kind == "infer":
        r = http.post("/basilisk/infer", json={"prompt": "\x02the", "max_new_tokens": n, "min_length": 0},
                      headers=BASILISK_AUTH)
        return kind, r.status_code == 200 and len(r.json()["tokens"]) <= n
    if kind == "tokenize":
        r = http.post("/basilisk/tokenize", json={"prompt": "hello world"}, headers=BASILISK_AUTH)
        return kind, r.status_code == 200 and len(r.json()["tokens"]) > 0
    if kind == "invalid":
        r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": "many"}, headers=OPENAI_AUTH)
        return kind, r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert kind == "unauthorized"
    r = http.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"})
    return kind, r.status_code == 401


KINDS = ("completion", "chat", "completion_stream", "chat_stream", "infer", "tokenize", "invalid", "unauthorized")


def test_load_every_request_is_answered(served: Served) -> None:
    n_requests, n_clients = 320, 16
    rng = random.Random(0)
    kinds = [KINDS[i % len(KINDS)] for i in range(n_requests)]
    rng.shuffle(kinds)
    per_client = [kinds[c::n_clients] for c in range(n_clients)]
    served.recorder.runs.clear()

    def client(c: int) -> list[tuple[str, bool]]:
        crng = random.Random(c)
        with httpx.Client(base_url=served.url, timeout=60) as http:
            return [one_request(http, kind, crng) for kind in per_client[c]]

    start = time.monotonic()
    with ThreadPoolExecutor(n_clients) as pool:
        answers = [a for batch in pool.map(client, range(n_clients)) for a in batch]
    elapsed = time.monotonic() - start
    assert len(answers) == n_requests
    failed = Counter(kind for kind, ok in answers if not ok)
    assert not failed, failed
    generating = sum(k not in ("tokenize", "invalid", "unauthorized") for k in kinds)
    assert len(served.recorder.runs) == generating  # each generating request ran exactly once
    assert all(result.stats.stop_reason in ("length", "eos") for _, result in served.recorder.runs)
    assert elapsed < 60
