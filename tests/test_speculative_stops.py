"""Stops act at the exact token inside an accepted path, and the cache stays consistent after them."""
from __future__ import annotations

import pytest
from speculative_testing import speculating
from tiny_model import GREEDY, build_tiny_engine, make_tiny_model_dir

from llama.generation import Generation
from llama.sampling import Sampler
from llama.speculative.planner import TreeShape

DEPTH = 6  # with the target's own weights as the draft, every pass accepts DEPTH tokens
PROMPT = "A language model reads tokens and predicts"


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("stops")
    plain = build_tiny_engine(root)
    spec = speculating(build_tiny_engine(root), TreeShape(DEPTH, 1), draft=make_tiny_model_dir(root))
    return plain, spec


def _gen(engine, n: int = 20, **kwargs) -> Generation:
    engine.generator.reset()
    return engine.generator.generate(engine.tokenizer.encode(PROMPT, bos=True), Sampler(GREEDY), n, **kwargs)


def _assert_consistent(engine, out: Generation) -> None:
    """The cache holds a prefix of prompt + reply, and a follow-up turn continues as a fresh run would."""
    gen = engine.generator
    prompt = engine.tokenizer.encode(PROMPT, bos=True)
    assert gen.cached == (prompt + out.token_ids)[: len(gen.cached)]
    assert len(gen.cached) >= len(prompt) + len(out.token_ids) - 1
    follow = prompt + out.token_ids + engine.tokenizer.encode(" more")
    again = gen.generate(follow, Sampler(GREEDY), 8, stop_ids=set())
    gen.reset()
    assert again.token_ids == gen.generate(follow, Sampler(GREEDY), 8, stop_ids=set()).token_ids


# Offsets 1..DEPTH+1 fall inside the first accepted path and on its bonus token; the rest in later passes.
OFFSETS = range(1, 2 * DEPTH + 3)


@pytest.mark.parametrize("k", OFFSETS)
def test_max_new_tokens(engines, k):
    plain, spec = engines
    out = _gen(spec, k, stop_ids=set())
    assert out.token_ids == _gen(plain, k, stop_ids=set()).token_ids and len(out.token_ids) == k
    assert out.stats.stop_reason == "length"
    _assert_consistent(spec, out)


@pytest.mark.parametrize("k", OFFSETS)
def test_eos(engines, k):
    plain, spec = engines
    free = _gen(plain, 20, stop_ids=set()).token_ids
    eos = {free[k]}
    out = _gen(spec, 20, stop_ids=eos)
    assert out.token_ids == _gen(plain, 20, stop_ids=eos).token_ids == free[: free.index(free[k])]
    assert out.stats.stop_reason == "eos"
    _assert_consistent(spec, out)


@pytest.mark.parametrize("k", OFFSETS)
def test_interrupt(engines, k):
    plain, spec = engines
    calls = iter(range(100))
    out = _gen(spec, 30, stop_ids=set(), should_stop=lambda: next(calls) >= k - 1)
    assert len(out.token_ids) == k and out.stats.stop_reason == "interrupted"
    assert out.token_ids == _gen(plain, k, stop_ids=set()).token_ids
    _assert_consistent(spec, out)


def test_closing_the_stream_inside_an_accepted_path(engines):
    """What the console does on Ctrl-C: it stops reading and closes the stream."""
    plain, spec = engines
    spec.generator.reset()
    out = Generation()
    stream = spec.generator.stream(
        spec.tokenizer.encode(PROMPT, bos=True), Sampler(GREEDY), 30, stop_ids=set(), result=out
    )
    for _ in stream:
        if len(out.token_ids) >= 3:
            break
    stream.close()
    assert out.token_ids == _gen(plain, len(out.token_ids), stop_ids=set()).token_ids
    _assert_consistent(spec, out)


@pytest.mark.parametrize("k", [2, DEPTH, DEPTH + 3])
def test_stop_string(engines, k):
    plain, spec = engines
    text = _gen(plain, 30, stop_ids=set()).text
    stop = text[k : k + 2]
    want = _gen(plain, 30, stop_ids=set(), stop_strings=[stop])
    out = _gen(spec, 30, stop_ids=set(), stop_strings=[stop])
    assert out.text == want.text == text[: text.index(stop)] and out.stats.stop_reason == "stop_string"
    assert out.token_ids == want.token_ids
    _assert_consistent(spec, out)
