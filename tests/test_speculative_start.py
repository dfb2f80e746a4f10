"""When speculation starts: only once the tokens ahead (the reply's remaining ones and as many as were decoded
before it) could repay what starting costs, estimated from the plain passes, graph captures and prefill rate."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from speculative_testing import speculating
from tiny_model import GREEDY, build_tiny_engine, make_tiny_model_dir

from llama.generation import GenerationStats
from llama.sampling import Sampler
from llama.speculative import decoder

PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("start")


def _reply(engine, n: int):
    ids = engine.tokenizer.encode(PROMPT, bos=True)
    return engine.generator.generate(ids, Sampler(GREEDY), n, stop_ids=set())


def _threshold() -> float:
    """Tokens ahead at which lookup alone (no draft model, no graphs on the CPU: the start costs START_PASSES
    plain passes) starts: both sides scale with the plain pass time, so this holds whatever the machine's speed."""
    saving = decoder.Planner(8, has_draft_model=False, announce=print).best_saving(0.0)
    return decoder.PAYBACK * decoder.START_PASSES / saving


def test_a_reply_too_short_to_repay_the_start_stays_plain_and_says_so_once(root, capsys):
    short, long = math.floor(_threshold()) - 1, math.ceil(_threshold()) + 1
    assert short > decoder.PROBE_AFTER + 1  # without the gate, both replies would probe
    plain = build_tiny_engine(root)
    for n, starts in ((short, False), (long, True)):
        engine = speculating(build_tiny_engine(root), lookup=True)
        capsys.readouterr()
        out = _reply(engine, n)
        assert out.token_ids == _reply(plain, n).token_ids
        assert bool(engine.generator.speculator.planner.passes) == starts  # the probe's tree passes
        said = capsys.readouterr().err.count("speculation: not started yet")
        assert said == (0 if starts else 1)


def test_a_conversation_that_went_on_starts_in_a_short_reply(root):
    short = math.floor(_threshold()) - 1
    engine = speculating(build_tiny_engine(root), lookup=True)
    _reply(engine, short)
    assert not engine.generator.speculator.planner.passes
    _reply(engine, short)  # the tokens decoded before count as tokens ahead
    assert engine.generator.speculator.planner.passes


def test_the_start_cost_counts_the_probe_graph_captures_and_the_drafts_catch_up(root):
    engine = speculating(build_tiny_engine(root), draft=make_tiny_model_dir(root, name="d", dim=32, n_heads=2,
                                                                            n_kv_heads=2))
    gen, speculator = engine.generator, engine.generator.speculator
    speculator.planner.observe_plain_pass(0.01)
    history = engine.tokenizer.encode(PROMPT, bos=True)
    stats = GenerationStats(prefill_seconds=0.5, prefilled_tokens=100)
    share = speculator._draft_share(gen)
    assert 0 < share < 1
    catch_up = len(history) * 0.005 * share  # the draft holds nothing yet
    assert speculator._start_seconds(gen, history, stats) == pytest.approx(decoder.START_PASSES * 0.01 + catch_up)
    gen.steps = SimpleNamespace(capture=True, captured=2, capture_seconds=0.2)  # two graphs took 0.1 s each
    graphs = decoder.START_GRAPHS * 0.1
    assert speculator._start_seconds(gen, history, stats) == pytest.approx(decoder.START_PASSES * 0.01 + catch_up + graphs)


def test_plain_tokens_before_the_start_take_the_steps_argmax_as_plain_greedy_does(root, monkeypatch):
    """Where the model has decode steps, greedy plain decoding takes each token from the step's argmax on the device
    (one id copied back): the speculator's plain tokens do the same, so a reply it keeps plain is plain greedy's."""
    from llama.decode_graphs import DecodeSteps

    plain, engine = build_tiny_engine(root), speculating(build_tiny_engine(root), lookup=True)
    for e in (plain, engine):
        e.generator.steps = DecodeSteps(e.model, e.generator.cache, capture=False)
    decodes = []
    real = engine.generator.steps.decode
    monkeypatch.setattr(engine.generator.steps, "decode", lambda *a: (decodes.append(a), real(*a))[1])
    n = math.floor(_threshold()) - 1
    assert _reply(engine, n).token_ids == _reply(plain, n).token_ids
    assert len(decodes) == n - 1 and not engine.generator.speculator.planner.passes
