"""Batched decoding over HTTP: concurrent requests on every route reply as each does alone (greedy and seeded),
a client that disconnects leaves the others unchanged, and /basilisk/config reports the load."""
from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from batch_testing import Request, alone
from server_harness import CTX, MAX_BATCH, SECRET, RecordedServer, recorded_server, wait_until


AUTH = {"/basilisk": {"Authorization": SECRET}, "/v1": {"Authorization": f"Bearer {SECRET}"}}
USER = [{"role": "user", "content": "hi there, how are you"}]
TURNS = [*USER, {"role": "assistant", "content": "fine"}, {"role": "user", "content": "and now?"}]
# Eight requests: both APIs, streamed and not, different prompts, lengths, stop strings and penalties.
MIXED = [
    ("/basilisk/infer", {"prompt": "\x02The quick brown fox", "max_new_tokens": 12, "stopping_strings": [],
                         "min_length": 0}),
    ("/basilisk/infer", {"prompt": "\x02once upon a time", "max_new_tokens": 20}),
    ("/basilisk/infer", {"prompt": "\x02import os", "max_new_tokens": 7, "stopping_strings": ["e"],
                         "repetition_penalty": 1.3}),
    ("/basilisk/infer", {"prompt": "\x02a b c", "max_new_tokens": 30, "stopping_strings": ["xyz", "qa"]}),
    ("/v1/completions", {"prompt": "hello world", "max_tokens": 16}),
    ("/v1/completions", {"prompt": "the cat sat on", "max_tokens": 25, "stop": ["at", "psp"], "stream": True}),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 9}),
    ("/v1/chat/completions", {"messages": TURNS, "max_tokens": 18, "stream": True, "stop": "el",
                              "presence_penalty": 0.5}),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RecordedServer]:
    with recorded_server(tmp_path_factory.mktemp("batch-http")) as served:
        yield served


def send(url: str, path: str, body: dict[str, Any]) -> list[tuple[str, str]]:
    """(reply text, how it ended) of each choice of one request, streamed or not."""
    headers = AUTH["/basilisk" if path.startswith("/basilisk") else "/v1"]
    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
        if not body.get("stream"):
            response = http.post(path, json=body)
            assert response.status_code == 200, response.text
            reply = response.json()
            if path == "/basilisk/infer":
                return [(reply["text"], str(reply["tokens"]))]
            choices = reply["choices"]
            return [(c["text"] if "text" in c else c["message"]["content"], c["finish_reason"]) for c in choices]
        with http.stream("POST", path, json=body) as response:
            assert response.status_code == 200
            events = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines()
                      if line and line != "data: [DONE]"]
        choices = [e["choices"][0] for e in events]
        text = "".join(c.get("text") or c.get("delta", {}).get("content") or "" for c in choices)
        return [(text, choices[-1]["finish_reason"])]


def all_at_once(served: RecordedServer, requests: list[tuple[str, dict[str, Any]]]) -> list[list[tuple[str, str]]]:
    """Send every request concurrently; none runs before all of their choices wait in line."""
    served.recorder.forget()
    served.recorder.go.clear()
    with ThreadPoolExecutor(len(requests)) as pool:
        try:
            sent = [pool.submit(send, served.url, path, body) for path, body in requests]
            jobs = sum(body.get("n", 1) for _, body in requests)
            wait_until(lambda: httpx.get(served.url + "/health").json()["queued"] == jobs, "all wait")
        finally:
            served.recorder.go.set()
        return [f.result() for f in sent]


def test_eight_concurrent_requests_reply_as_each_alone(served: RecordedServer) -> None:
    each_alone = [send(served.url, path, body) for path, body in MIXED]
    together = all_at_once(served, MIXED)
    assert served.recorder.largest_batch == MAX_BATCH
    assert together == each_alone
    assert {reason for reply in each_alone for _, reason in reply} >= {"stop", "length"}


def test_a_greedy_completion_in_a_batch_is_the_generators_reply(served: RecordedServer) -> None:
    tok = served.engine.tokenizer
    want = alone(served.engine.model, tok, Request(tok.encode("hello world", bos=True), 16), CTX)
    assert all_at_once(served, MIXED)[4] == [(want.text, "length")]


def test_seeded_sampling_is_the_same_alone_and_batched(served: RecordedServer) -> None:
    warm = {"temperature": 0.9, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
    seeded = [("/v1/completions", {"prompt": p, "max_tokens": 14, "seed": 7 + i, **warm})
              for i, p in enumerate(["the cat", "hello", "a b c", "once upon"])]
    seeded.append(("/v1/completions", {"prompt": "the cat", "max_tokens": 10, "n": 3, "seed": 1, **warm}))
    each_alone = [send(served.url, path, body) for path, body in seeded]
    assert all_at_once(served, seeded) == each_alone
    assert len({text for reply in each_alone for text, _ in reply}) == 7  # seeds differ, so do the replies


def test_a_client_leaving_mid_stream_frees_its_slot_and_the_others_finish_unchanged(served: RecordedServer) -> None:
    others = [("/v1/completions", {"prompt": p, "max_tokens": 20, "stream": True}) for p in ("the fox", "a b")]
    each_alone = [send(served.url, path, body) for path, body in others]
    recorder = served.recorder
    recorder.forget()
    leaving = {"prompt": "one", "max_tokens": CTX - 16, "stream": True, "logit_bias": {"2": -100}}  # never EOS
    with ThreadPoolExecutor(2) as pool, httpx.Client(base_url=served.url, headers=AUTH["/v1"], timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=leaving) as response:
            next(line for line in response.iter_lines() if line)
            recorder.go.clear()  # the others join while it runs; nothing steps until its leaving is noticed
            sent = [pool.submit(send, served.url, path, body) for path, body in others]
            wait_until(lambda: httpx.get(served.url + "/health").json()["queued"] == 2, "the others wait")
        wait_until(lambda: any(seq.cancelled for seq in recorder.decoding), "the server noticed the client leave")
        recorder.go.set()
        assert [f.result() for f in sent] == each_alone
        wait_until(lambda: http.get("/basilisk/config", headers=AUTH["/basilisk"]).json()["batch"]["running"] == 0,
                   "every slot is free")
    abandoned = recorder.jobs[0].result.stats
    assert abandoned.stop_reason == "interrupted" and abandoned.new_tokens < CTX // 2


def test_config_reports_the_batch(served: RecordedServer) -> None:
    with httpx.Client(base_url=served.url + "/basilisk", headers=AUTH["/basilisk"], timeout=30) as http:
        before = http.get("/config").json()["batch"]
        reply = http.post("/infer", json={"prompt": "\x02hello", "max_new_tokens": 5, "min_length": 5}).json()
        after = http.get("/config").json()
    assert after["max_batch"] == MAX_BATCH
    batch = after["batch"]
    assert set(batch) == {"max_batch", "running", "queued", "decode_tokens_per_s", "decoded_tokens"}
    assert batch["running"] == batch["queued"] == 0 and batch["decode_tokens_per_s"] > 0
    assert batch["decoded_tokens"] == before["decoded_tokens"] + len(reply["tokens"]) - 1  # the first: prefill's
