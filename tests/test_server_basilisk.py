"""The basilisk-compatible endpoints over HTTP against a real server with a shared secret."""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from server_harness import CTX, SECRET, build_server_engine, running_server

from engine.build import Engine
from llama.generation import Generation
from llama.sampling import Sampler, SamplingParams

PROMPT = "\x02The quick brown fox"


@dataclass
class Served:
    url: str
    engine: Engine
    greedy: Generation  # PROMPT, greedy without any penalty, 16 tokens, computed on the engine directly

    def http(self, secret: str | None = SECRET) -> httpx.Client:
        headers = {} if secret is None else {"Authorization": secret}
        return httpx.Client(base_url=self.url + "/basilisk", headers=headers, timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    engine = build_server_engine(tmp_path_factory.mktemp("basilisk"))
    tok = engine.tokenizer
    ids = [tok.bos_id, *tok.encode(PROMPT[1:])]
    greedy = engine.generator.generate(ids, Sampler(SamplingParams(temperature=0.0, repetition_penalty=1.0)), 16)
    with running_server(engine, SECRET) as url:
        yield Served(url, engine, greedy)


def plain_infer(**fields) -> dict:
    """An infer body that reproduces the plain greedy reference: no penalties, no stops, no min_length."""
    body = {"prompt": PROMPT, "temperature": 0.0, "max_new_tokens": 16, "stopping_strings": [], "min_length": 0,
            "repetition_penalty": 1.0}
    return {**body, **fields}


def test_ping(served: Served) -> None:
    with served.http() as http:
        response = http.get("/ping")
    assert response.status_code == 200 and response.text == "pong"


def test_config_shows_settings_without_paths_or_secrets(served: Served) -> None:
    with served.http() as http:
        config = http.get("/config").json()
    assert config["ctx"] == CTX and config["model"] == "tiny-llama"
    assert config["sampling"]["temperature"] == 0.0 and config["device"] == "cpu"
    assert not {"model_dir", "tokenizer", "shared_secret"} & set(config)
    text = str(config)
    assert SECRET not in text and str(served.engine.cfg.model_dir) not in text


def test_tokenize_maps_stx_etx_and_special_convert(served: Served) -> None:
    tok = served.engine.tokenizer
    with served.http() as http:
        plain = http.post("/tokenize", json={"prompt": "\x02the cat\x03"}).json()
        converted = http.post("/tokenize", json={"prompt": "<s>the cat</s>", "special_convert": True}).json()
        literal = http.post("/tokenize", json={"prompt": "<s>the cat</s>"}).json()
    assert plain["tokens"] == [tok.bos_id, *tok.encode("the cat"), tok.eos_id]
    assert converted["tokens"] == plain["tokens"]
    assert tok.bos_id not in literal["tokens"]
    assert len(plain["fragments"]) == len(plain["tokens"])
    assert "".join(plain["fragments"]) == tok.decode(plain["tokens"])


def test_tokenize_refuses_a_lone_surrogate(served: Served) -> None:
    with served.http() as http:
        response = http.post("/tokenize", content=json.dumps({"prompt": "ok \ud800"}).encode(),
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "surrogate (\\ud800) at character 3" in response.text


def test_infer_is_the_engines_greedy_reply(served: Served) -> None:
    with served.http() as http:
        reply = http.post("/infer", json=plain_infer()).json()
    assert reply == {"text": served.greedy.text, "tokens": served.greedy.token_ids}


def test_infer_stopping_strings_cut_the_reply(served: Served) -> None:
    ref = served.greedy.text
    stop = next(c for c in ref[2:] if c.isascii() and c.isalnum())
    with served.http() as http:
        reply = http.post("/infer", json=plain_infer(stopping_strings=[stop])).json()
    assert reply["text"] == ref[: ref.index(stop)]
    assert reply["tokens"] == served.greedy.token_ids[: len(reply["tokens"])]


def test_infer_penalties_change_the_reply_as_described(served: Served) -> None:
    greedy = served.greedy.token_ids
    with served.http() as http:
        # inhibit the greedy reply position by position: its first token can no longer come first
        inhibited = http.post("/infer", json=plain_infer(
            positional_repeat_inhibit=[greedy], positional_repetition_penalty=1e6, max_new_tokens=4)).json()
        # penalty 0 turns the positional inhibit off
        off = http.post("/infer", json=plain_infer(
            positional_repeat_inhibit=[greedy], positional_repetition_penalty=0, max_new_tokens=4)).json()
        # a huge repetition penalty over the whole history forbids reusing any earlier token (exllama's names)
        body = plain_infer(token_repetition_penalty_max=1e6, token_repetition_penalty_sustain=-1, max_new_tokens=8)
        del body["repetition_penalty"]  # else it wins over its alias
        fresh = http.post("/infer", json=body).json()
    assert inhibited["tokens"][0] != greedy[0]
    assert off["tokens"] == greedy[:4]
    prompt_ids = set(served.engine.tokenizer.encode(PROMPT[1:]))
    assert len(set(fresh["tokens"])) == len(fresh["tokens"]) and not prompt_ids & set(fresh["tokens"])


def test_infer_min_length_holds_back_stop_tokens(served: Served) -> None:
    tok = served.engine.tokenizer
    # a repetition "penalty" below 1 boosts the history's tokens; with EOS in the prompt (ETX) it is chosen
    eager = plain_infer(prompt="\x02\x03\x03", repetition_penalty=1e-3, repetition_penalty_sustain=-1)
    with served.http() as http:
        without = http.post("/infer", json=eager).json()
        held = http.post("/infer", json={**eager, "min_length": 4}).json()
    assert without["tokens"] == []  # the setup works: EOS comes first
    assert len(held["tokens"]) >= 4 and tok.eos_id not in held["tokens"][:4]


def test_embed_is_not_implemented(served: Served) -> None:
    with served.http() as http:
        response = http.post("/embed", json={"prompt": "x"})
    assert response.status_code == 501 and "embedding" in response.text


@pytest.mark.parametrize(
    "body, words",
    [
        (b"{oops", "not valid JSON"),
        ({"max_new_tokens": 3}, "missing required field 'prompt'"),
        ({"prompt": 12}, "'prompt'"),
        ({"prompt": "x", "max_new_tokens": "3"}, "'max_new_tokens'"),
        ({"prompt": "x", "stopping_strings": "\n"}, "'stopping_strings'"),
        ({"prompt": "x", "positional_repeat_inhibit": [[100000]]}, "outside the vocabulary"),
        ({"prompt": "the quick brown fox " * CTX}, "context"),
        ({"prompt": "x", "max_new_tokens": CTX}, "max_new_tokens"),
        ({"prompt": ""}, "empty"),
        (json.dumps({"prompt": "a\udc00"}).encode(), "lone UTF-16 surrogate (\\udc00) at character 1"),
        (json.dumps({"prompt": "x", "stopping_strings": ["\ud800"]}).encode(), "'stopping_strings'"),
        ({"prompt": "x", "temperature": 1e300}, "'temperature': must be 0 or within"),
        ({"prompt": "x", "temperature": 1e-40}, "'temperature': must be 0 or within"),
        ({"prompt": "x", "token_repetition_penalty_max": 1e300}, "'token_repetition_penalty_max'"),
        ({"prompt": "x", "positional_repeat_inhibit": [[1]], "positional_repetition_penalty": 1e300},
         "'positional_repetition_penalty'"),
        ({"prompt": "x", "token_repetition_penalty_sustain": 10**30}, "'token_repetition_penalty_sustain'"),
        ({"prompt": "x", "token_repetition_penalty_decay": 10**30}, "'token_repetition_penalty_decay'"),
        (b'{"prompt": "x", "repetition_penalty": Infinity}', "finite"),
    ],
)
def test_infer_bad_requests_are_400_with_a_message(served: Served, body, words) -> None:
    with served.http() as http:
        if isinstance(body, bytes):
            response = http.post("/infer", content=body, headers={"Content-Type": "application/json"})
        else:
            response = http.post("/infer", json=body)
        assert response.status_code == 400 and words in response.text, response.text
        assert http.post("/infer", json=plain_infer(max_new_tokens=2)).status_code == 200


def test_shared_secret_is_required_verbatim(served: Served) -> None:
    for secret in (None, "wrong", f"Bearer {SECRET}", SECRET[:-1]):
        with served.http(secret) as http:
            for response in (http.get("/ping"), http.get("/config"), http.post("/infer", json=plain_infer())):
                assert response.status_code == 403 and response.text == "unauthorized"


def test_with_a_shared_secret_any_host_is_served(served: Served) -> None:
    with served.http() as http:
        assert http.get("/ping", headers={"Host": "evil.example"}).text == "pong"
