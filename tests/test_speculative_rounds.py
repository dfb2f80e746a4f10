"""What the speculative loop measures and how the draft catches up: the probe's pass sizes, its start once plain
tokens have taken long, timings that span a graph capture left out, and the draft's chain catch-up through the
decode steps proposing what its prefill path proposes."""
from __future__ import annotations

import pytest
import torch
from speculative_testing import speculating, start_at_once
from tiny_model import GREEDY, build_tiny_engine, make_tiny_model_dir

from llama.decode_graphs import MAX_GRAPH_TOKENS, DecodeSteps
from llama.sampling import Sampler
from llama.speculative import decoder
from llama.speculative.draft import DraftModel
from llama.speculative.tree import TokenTree

PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("rounds")


def _decode(engine, n: int):
    engine.generator.reset()
    ids = engine.tokenizer.encode(PROMPT, bos=True)
    return engine.generator.generate(ids, Sampler(GREEDY), n, stop_ids=set())


class _Clock:
    """time.perf_counter for the loop: every reading 0.3 s after the last, so each plain pass 'takes' 0.3 s."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.3
        return self.now


def test_slow_plain_tokens_start_the_probe_early_and_it_times_two_far_apart_sizes(root, monkeypatch):
    engine = speculating(build_tiny_engine(root), draft=make_tiny_model_dir(root))
    planner = engine.generator.speculator.planner
    start_at_once(monkeypatch)
    monkeypatch.setattr(decoder.time, "perf_counter", _Clock())
    _decode(engine, 8)
    assert 1 <= len(planner.plain_passes) < decoder.PROBE_AFTER  # probed after 0.5 s of plain tokens, not 16
    assert {n for n, _ in planner.passes} >= {2, planner.max_tokens}


def test_the_probes_large_tree_is_no_deeper_than_the_planners_deepest_shape():
    """A chain of 256 nodes would time attention over paths of 256 slots a query, which no planned tree has."""
    from llama.speculative.planner import DEPTHS

    for size in (1, 2, DEPTHS[-1] + 1, 64, 256):
        tree = decoder._probe_tree(9, size)
        assert len(tree) == size
        assert max(tree.depths) == min(size - 1, DEPTHS[-1])


class _CapturingSteps(DecodeSteps):
    """Uncaptured steps that count a 'capture' the first time each tree size runs, as graphs would."""

    def __init__(self, *args) -> None:
        super().__init__(*args, capture=False)
        self._sizes: set[int] = set()

    def tree(self, tokens, start, positions, mask, paths=None):
        if len(tokens) not in self._sizes:
            self._sizes.add(len(tokens))
            self.captured += 1
        return super().tree(tokens, start, positions, mask, paths)


def test_passes_that_captured_a_graph_are_not_observed(root):
    engine = speculating(build_tiny_engine(root), draft=make_tiny_model_dir(root))
    gen = engine.generator
    gen.steps = _CapturingSteps(gen.model, gen.cache)
    speculator = gen.speculator
    _decode(engine, 4)  # prefill and a few tokens: the cache holds a context
    start = len(gen.cached)
    tree = TokenTree(gen.cached[-1])
    tree.add_path(0, [5, 6, 7], 4)
    positions, mask = decoder.tree_attention(tree, start)
    observed = len(speculator.planner.passes)
    for _ in range(2):
        speculator._timed(speculator._tree_pass, len(tree), gen, tree, start, positions, mask)
    assert len(speculator.planner.passes) == observed + 1  # the first, which 'captured', is left out


@torch.inference_mode()
def test_the_drafts_chain_catch_up_proposes_what_its_prefill_does(root):
    """Two drafts of the same weights, one catching up through (uncaptured) decode steps, one through prefill,
    over rounds whose accepted paths differ in length: the same trees."""
    model_dir = make_tiny_model_dir(root, name="draft-steps")
    drafts = []
    for with_steps in (False, True):
        gen = build_tiny_engine(root, model_dir=model_dir).generator
        if with_steps:
            gen.steps = DecodeSteps(gen.model, gen.cache, capture=False)
        drafts.append(DraftModel(gen))
    history = list(range(5, 40))
    for accepted in (0, 2, 1, 3):
        trees = []
        for draft in drafts:
            tree = TokenTree(history[-1])
            draft.propose(tree, history, 4, 2, 9)
            node, path = 0, []
            while len(path) < accepted and tree.children[node]:
                node = next(iter(tree.children[node].values()))
                path.append(node)
            draft.accept(len(history) - 1, path, tree)
            trees.append((tree.tokens, tree.parents, path))
        assert trees[0] == trees[1]
        history += [trees[0][0][n] for n in trees[0][2]] + [history[-1] % 50 + 3]  # the path, then a bonus token


def test_a_round_whose_draft_caught_up_on_a_prompt_is_not_timed(root):
    """A draft far behind (a new prompt, speculation off for a while) prefills: a one-off cost. On the CPU, where
    every catch-up is a prefill, one of a round's few tokens is timed as usual."""
    engine = speculating(build_tiny_engine(root), draft=make_tiny_model_dir(root))
    gen = engine.generator
    speculator = gen.speculator
    _decode(engine, 4)
    history = list(gen.cached) + [9] * (MAX_GRAPH_TOKENS + 1)
    speculator._draft(gen, TokenTree(history[-1]), history, decoder.TreeShape(2, 1))  # the whole context
    assert speculator.draft.long_catch_ups == 1 and speculator.planner.draft_steps == 0
    speculator._draft(gen, TokenTree(history[-1]), history, decoder.TreeShape(2, 1))  # caught up
    assert speculator.draft.long_catch_ups == 1 and speculator.planner.draft_steps == 2


def _off_throughout(root, monkeypatch, could_pay: bool):
    """A speculator with a draft whose planner keeps speculation off, tries due every 4 plain tokens at first."""
    engine = speculating(build_tiny_engine(root), draft=make_tiny_model_dir(root))
    speculator = engine.generator.speculator
    speculator.planner.needs_probe = lambda: False
    speculator.planner.choose = lambda: None
    speculator.planner.could_pay = lambda: could_pay
    monkeypatch.setattr(decoder, "EXPLORE_EVERY", 4)
    speculator._explore_every = 4
    return engine, speculator


def test_tries_while_speculation_is_off_grow_twice_as_far_apart(root, monkeypatch):
    engine, speculator = _off_throughout(root, monkeypatch, could_pay=True)
    events = []  # "p": a plain pass, "t": a try's draft
    for name, mark in (("_draft", "t"), ("_plain_token", "p")):
        real = getattr(speculator, name)
        monkeypatch.setattr(speculator, name, lambda *a, real=real, mark=mark: (events.append(mark), real(*a))[1])
    _decode(engine, 60)
    runs = [len(run) for run in "".join(events).split("t")]
    assert runs[:3] == [4, 8, 16]  # plain passes before each try


def test_no_tries_while_off_where_no_acceptance_could_make_speculation_pay(root, monkeypatch):
    engine, speculator = _off_throughout(root, monkeypatch, could_pay=False)
    drafts = []
    real = speculator._draft
    monkeypatch.setattr(speculator, "_draft", lambda *a: (drafts.append(a), real(*a))[1])
    _decode(engine, 60)
    assert drafts == []
