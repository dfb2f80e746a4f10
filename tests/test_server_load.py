"""The engine queue over HTTP: arrival order beyond the batch's slots, clients that leave mid-generation, and a
bounded load test of 64 clients."""
from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from server_harness import CTX, MAX_BATCH, SECRET, RecordedServer, recorded_server, wait_until

OPENAI_AUTH = {"Authorization": f"Bearer {SECRET}"}
BASILISK_AUTH = {"Authorization": SECRET}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RecordedServer]:
    with recorded_server(tmp_path_factory.mktemp("load")) as served:
        yield served


@pytest.fixture
def slow(served: RecordedServer) -> Iterator[RecordedServer]:
    served.recorder.delay = 0.02
    served.recorder.forget()
    yield served
    served.recorder.delay = 0.0


def long_request(prompt: str, stream: bool) -> dict[str, Any]:
    """A completion as long as the context allows: about CTX * 0.02 s = 5 s when slowed."""
    return {"prompt": prompt, "max_tokens": CTX - 16, "temperature": 0.0, "stream": stream,
            "logit_bias": {"2": -100}}  # never EOS: it must run its full length unless stopped


def running(http: httpx.Client) -> int:
    return http.get("/basilisk/config", headers=BASILISK_AUTH).json()["batch"]["running"]


def test_client_leaving_mid_stream_frees_its_slot(slow: RecordedServer) -> None:
    with httpx.Client(base_url=slow.url, headers=OPENAI_AUTH, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=long_request("one", stream=True)) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line)
            assert first.startswith("data: ")
        # the stream is closed: the connection drops with most of the reply not generated
        wait_until(lambda: running(http) == 0, "the abandoned sequence left the batch")
        after = http.post("/v1/completions", json={"prompt": "two", "max_tokens": 2})
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == 2
    abandoned = slow.recorder.jobs[0].result.stats
    assert abandoned.stop_reason == "interrupted" and abandoned.new_tokens < CTX // 2


def test_client_timing_out_on_a_plain_request_frees_its_slot(slow: RecordedServer) -> None:
    with httpx.Client(base_url=slow.url, headers=OPENAI_AUTH) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=long_request("one", stream=False), timeout=0.5)
        wait_until(lambda: running(http) == 0, "the abandoned sequence left the batch")
    abandoned = slow.recorder.jobs[0].result.stats
    assert abandoned.stop_reason == "interrupted" and abandoned.new_tokens < CTX // 2


def test_requests_beyond_the_slots_wait_and_are_served_in_arrival_order(served: RecordedServer) -> None:
    served.recorder.forget()
    served.recorder.go.clear()  # nothing runs until all of them wait in line
    n = MAX_BATCH + 3

    def send(i: int) -> httpx.Response:
        body = {"prompt": f"request {i}", "max_tokens": 12, "logit_bias": {"2": -100}}
        return httpx.post(served.url + "/v1/completions", json=body, headers=OPENAI_AUTH, timeout=60)

    with ThreadPoolExecutor(n) as pool, httpx.Client(base_url=served.url) as http:
        try:
            sent = []
            for i in range(n):  # each one is sent once the one before it waits in line
                sent.append(pool.submit(send, i))
                wait_until(lambda: http.get("/health").json()["queued"] == i + 1, f"request {i} waits its turn")
            batch = http.get("/basilisk/config", headers=BASILISK_AUTH).json()["batch"]
            assert batch["queued"] == n and batch["running"] == 0 and batch["max_batch"] == MAX_BATCH
        finally:
            served.recorder.go.set()
        assert all(f.result().status_code == 200 for f in sent)
    tokenizer = served.recorder.generator.tokenizer
    want = [tokenizer.encode(f"request {i}", bos=True) for i in range(n)]
    assert [job.prompt for job in served.recorder.admitted] == want
    assert (MAX_BATCH, n - MAX_BATCH) in served.recorder.loads  # every slot busy, the rest waiting


def test_health_answers_without_the_secret(served: RecordedServer) -> None:
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


def test_load_every_request_is_answered(served: RecordedServer) -> None:
    n_requests, n_clients = 320, 64
    rng = random.Random(0)
    kinds = [KINDS[i % len(KINDS)] for i in range(n_requests)]
    rng.shuffle(kinds)
    per_client = [kinds[c::n_clients] for c in range(n_clients)]
    served.recorder.forget()

    def client(c: int) -> list[tuple[str, bool]]:
        crng = random.Random(c)
        with httpx.Client(base_url=served.url, timeout=60) as http:
            return [one_request(http, kind, crng) for kind in per_client[c]]

    with ThreadPoolExecutor(n_clients) as pool:
        answers = [a for batch in pool.map(client, range(n_clients)) for a in batch]
    assert len(answers) == n_requests
    failed = Counter(kind for kind, ok in answers if not ok)
    assert not failed, failed
    generating = sum(k not in ("tokenize", "invalid", "unauthorized") for k in kinds)
    assert len(served.recorder.jobs) == generating  # each generating request ran exactly once
    assert all(job.result.stats.stop_reason in ("length", "eos") for job in served.recorder.jobs)
