"""Greedy speculative decoding equals plain greedy decoding token for token, whatever the draft."""
from __future__ import annotations

from dataclasses import replace

import pytest
from speculative_testing import force_shape, speculating, start_at_once
from tiny_model import GREEDY, build_tiny_engine, make_tiny_model_dir

from llama.generation import Generation
from llama.sampling import Sampler, SamplingParams
from llama.speculative.planner import TreeShape

PROMPTS = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "Hello world, this is a tiny corpus. Hello world, this",
]
SHAPES = [TreeShape(1, 1), TreeShape(4, 1), TreeShape(3, 3), TreeShape(6, 4)]
PENALIZED = replace(GREEDY, repetition_penalty=1.3, repetition_window=16)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("spec")


@pytest.fixture(scope="module")
def plain(root):
    return build_tiny_engine(root)


@pytest.fixture(scope="module", params=["same-weights", "other-model", "lookup", "both"])
def spec(request, root):
    """The target with a draft source: its own weights (accepts everything), a weak model, lookup, or two."""
    engine = build_tiny_engine(root)
    if request.param == "same-weights":
        return speculating(engine, draft=make_tiny_model_dir(root))
    other = make_tiny_model_dir(root, name="other-draft", dim=32, n_heads=2, n_kv_heads=2)
    if request.param == "other-model":
        return speculating(engine, draft=other)
    if request.param == "lookup":
        return speculating(engine, lookup=True)
    return speculating(engine, draft=other, lookup=True)


def _run(engine, prompt: str, params: SamplingParams, n: int, **kwargs) -> Generation:
    engine.generator.reset()
    ids = engine.tokenizer.encode(prompt, bos=True)
    return engine.generator.generate(ids, Sampler(params), n, **kwargs)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{s.depth}w{s.width}")
@pytest.mark.parametrize("params", [GREEDY, PENALIZED], ids=["no-penalty", "penalty-1.3"])
def test_greedy_equals_plain_greedy(plain, spec, shape, params):
    force_shape(spec, shape)
    for prompt in PROMPTS:
        want = _run(plain, prompt, params, 40, stop_ids=set())
        got = _run(spec, prompt, params, 40, stop_ids=set())
        assert got.token_ids == want.token_ids
        assert got.stats.speculative and got.stats.decode_passes <= want.stats.decode_passes


def test_a_perfect_draft_fills_every_pass(root):
    engine = speculating(build_tiny_engine(root), TreeShape(5, 1), draft=make_tiny_model_dir(root))
    out = _run(engine, PROMPTS[0], GREEDY, 37, stop_ids=set())
    assert out.stats.decode_passes == 6 and out.stats.tokens_per_pass == 6.0  # 36 decoded tokens, 6 per pass


def test_the_planner_picks_a_plan_and_output_is_unchanged(root, plain, capsys, monkeypatch):
    start_at_once(monkeypatch)
    engine = speculating(build_tiny_engine(root), draft=make_tiny_model_dir(root), lookup=True)
    want = _run(plain, PROMPTS[1], GREEDY, 30, stop_ids=set())
    assert _run(engine, PROMPTS[1], GREEDY, 30, stop_ids=set()).token_ids == want.token_ids
    err = capsys.readouterr().err
    assert err.count("speculation: ") == 1 and "not started" not in err
