"""When speculation starts: only once the tokens ahead (the reply's remaining ones and as many as were decoded
before it) could repay what starting costs, estimated from the plain passes, graph captures and prefill rate."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
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


def _draft_engine(root):
    return speculating(build_tiny_engine(root), draft=make_tiny_model_dir(root, name="d", dim=32, n_heads=2,
                                                                          n_kv_heads=2))


def test_the_start_cost_counts_the_probe_graph_captures_and_the_drafts_catch_up(root):
    engine = _draft_engine(root)
    gen, speculator = engine.generator, engine.generator.speculator
    speculator.planner.observe_plain_pass(0.01)
    history = engine.tokenizer.encode(PROMPT, bos=True)
    stats = GenerationStats(prefill_seconds=0.5, prefilled_tokens=100)
    share = speculator._draft_weight_share(gen)
    assert 0 < share < 1
    catch_up = len(history) * 0.005 * share  # the draft holds nothing yet
    assert speculator._start_seconds(gen, history, stats) == pytest.approx(decoder.START_PASSES * 0.01 + catch_up)
    gen.device = torch.device("cuda")  # no steps on a GPU: the blocks stream, and passes of any size cost one
    assert speculator._start_seconds(gen, history, stats) == pytest.approx(
        decoder.START_PASSES_STREAMED * 0.01 + catch_up)
    gen.device = torch.device("cpu")
    # a graph would take 0.1 s; the first, setting up the process's kernels, took 0.7 s
    gen.steps = SimpleNamespace(capture=True, captured=2, capture_estimate=0.1, first_capture_seconds=0.7)
    graphs = decoder.START_GRAPHS * 0.1 + 0.7
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


def test_a_draft_whose_step_costs_about_a_plain_pass_keeps_even_a_long_reply_plain(root, monkeypatch, capsys):
    """On the CPU the draft's step is timed before the start (a small draft is bound by its per-layer overhead, not
    its weights): one as slow as the target's pass leaves nothing to save however long the reply; a free one starts."""
    long = 4 * math.ceil(_threshold())  # lookup alone starts here
    small_draft = make_tiny_model_dir(root, name="d8", dim=8, n_heads=2, n_kv_heads=2, n_layers=1)
    plain = _reply(build_tiny_engine(root), long).token_ids
    for step_seconds, starts in ((0.0, True), (10.0, False)):
        monkeypatch.setattr(decoder, "_timed_draft_step", lambda draft, history: step_seconds)
        engine = speculating(build_tiny_engine(root), draft=small_draft)
        capsys.readouterr()
        assert _reply(engine, long).token_ids == plain
        assert bool(engine.generator.speculator.planner.passes) == starts
        assert capsys.readouterr().err.count("speculation: not started yet") == (0 if starts else 1)


def test_the_drafts_step_is_timed_once_from_an_empty_cache_and_left_empty(root):
    engine = _draft_engine(root)
    gen, speculator = engine.generator, engine.generator.speculator
    speculator.planner.observe_plain_pass(1e-3)
    history = engine.tokenizer.encode(PROMPT, bos=True)
    share = speculator._draft_step_share(gen, history)
    assert share >= speculator._draft_weight_share(gen) > 0
    assert speculator.draft.generator.cached == []  # the catch-up runs the whole context, as it would have
    speculator.planner.observe_plain_pass(1.0)  # a later, slower pass: the estimate stands
    assert speculator._draft_step_share(gen, history) == share


def test_the_start_is_decided_once_a_reply(root, monkeypatch):
    engine = speculating(build_tiny_engine(root), lookup=True)
    speculator = engine.generator.speculator
    decisions = []
    real = speculator._decide_start
    monkeypatch.setattr(speculator, "_decide_start", lambda *a: (decisions.append(a), real(*a))[1])
    short = math.floor(_threshold()) - 1
    _reply(engine, short)
    assert len(decisions) == 1 and not speculator.planner.passes
    _reply(engine, short)  # a new reply decides anew (and, the conversation having gone on, starts)
    assert len(decisions) == 2 and speculator.planner.passes
