"""With speculation on (the --draft / --lookup flags), every request of the server uses it: basilisk infer
and the OpenAI routes reply as without it, and report the mean tokens per target pass."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from batch_testing import Request, alone
from server_harness import SECRET, build_server_engine, running_server
from speculative_testing import speculating
from tiny_model import make_tiny_model_dir

from llama.speculative.planner import TreeShape

PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox"
BODY = {"temperature": 0.0, "repetition_penalty": 1.0}


@pytest.fixture(scope="module")
def replies(tmp_path_factory):
    """(plain, speculative) replies to the same three requests."""
    root = tmp_path_factory.mktemp("spec-server")
    out = []
    for spec in (False, True):
        engine = build_server_engine(root)
        if spec:
            speculating(engine, TreeShape(4, 1), draft=make_tiny_model_dir(root), lookup=True)
        with running_server(engine, SECRET) as url:
            basilisk = httpx.post(url + "/basilisk/infer", headers={"Authorization": SECRET}, timeout=60, json={
                "prompt": "\x02" + PROMPT, "max_new_tokens": 24, "stopping_strings": [], "min_length": 0, **BODY})
            auth = {"Authorization": f"Bearer {SECRET}"}
            completion = httpx.post(url + "/v1/completions", headers=auth, timeout=60, json={
                "prompt": PROMPT, "max_tokens": 24, **BODY})
            chat = httpx.post(url + "/v1/chat/completions", headers=auth, timeout=60, json={
                "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24, **BODY})
        out.append([r.json() for r in (basilisk, completion, chat)])
    return out


def test_basilisk_infer(replies):
    (plain, _, _), (spec, _, _) = replies
    assert spec["tokens"] == plain["tokens"] and spec["text"] == plain["text"]
    assert "tokens_per_pass" not in plain and spec["tokens_per_pass"] > 1.0


@pytest.mark.parametrize("route", [1, 2], ids=["completions", "chat"])
def test_openai_routes(replies, route):
    plain, spec = replies[0][route], replies[1][route]
    assert spec["choices"] == plain["choices"]
    assert "tokens_per_target_pass" not in plain["usage"] and spec["usage"]["tokens_per_target_pass"] > 1.0


def test_concurrent_requests_with_speculation_reply_as_plain_greedy(tmp_path):
    """Several requests at once decode as a plain batch (the last one left speculates): the same greedy replies."""
    engine = speculating(build_server_engine(tmp_path), TreeShape(4, 1), lookup=True)
    prompts = [PROMPT, "Hello world, this is a tiny corpus. Hello world, this", "a b c a b c a b"]
    tok = engine.tokenizer
    want = [alone(engine.model, tok, Request(tok.encode(p, bos=True), 24), engine.ctx).text for p in prompts]
    auth = {"Authorization": f"Bearer {SECRET}"}
    with running_server(engine, SECRET) as url, ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(pool.map(lambda p: httpx.post(url + "/v1/completions", headers=auth, timeout=60, json={
            "prompt": p, "max_tokens": 24, **BODY}).json(), prompts))
    assert [r["choices"][0]["text"] for r in replies] == want
