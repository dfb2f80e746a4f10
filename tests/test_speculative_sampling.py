"""Sampling verification preserves the target's distribution after all the sampling processors.

The test: a tiny vocabulary (8 tokens) and a target whose logits depend on the whole path (so the
repetition penalty and the tree position matter), a fixed tree of candidates (three levels; under each
node the target's two most likely tokens and its least likely one, which the processors usually
remove), and N = 10,000 seeded draws of the first two tokens
that speculative sampling produces (one verification round, and a second one when the first stopped
after one token). Exact reference: the first token's distribution p1 = the sampler's distribution at
the root, the second's marginal sum_x p1(x) * p2(. | x). Bound: every token's empirical frequency is
within 5 standard errors, 5 * sqrt(p (1 - p) / N), of its exact probability (plus 1e-9): a false
failure has probability below 1e-5 over the 16 comparisons.
"""
from __future__ import annotations

import functools

import pytest
import torch

from llama.sampling import Sampler, SamplingParams
from llama.speculative.tree import TokenTree
from llama.speculative.verify import verify_tree

VOCAB = 8
DRAWS = 10_000
HISTORY = [3, 1, 4, 1, 5]
PARAMS = [
    pytest.param(SamplingParams(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0), id="plain"),
    pytest.param(
        SamplingParams(temperature=0.7, top_k=6, top_p=0.9, min_p=0.05, repetition_penalty=1.5, repetition_window=8),
        id="all-processors",
    ),
]


def _target_logits(context: list[int]) -> torch.Tensor:
    """Deterministic logits (VOCAB,) that depend on every token of the context and on its length."""
    return _logits_of(tuple(context))


@functools.cache
def _logits_of(context: tuple[int, ...]) -> torch.Tensor:
    seed = sum((i + 1) * 1009**i * t for i, t in enumerate(context)) % 2**31
    return 2.0 * torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed))


@functools.cache
def _tree_and_logits(history: tuple[int, ...]) -> tuple[TokenTree, torch.Tensor]:
    """Under each node (three levels): the target's two most likely tokens and its least likely one,
    which the processors usually remove; and the tree pass's logits (nodes, VOCAB)."""
    tree = TokenTree(history[-1])
    frontier = [0]
    for _ in range(3):
        nxt = []
        for node in frontier:
            order = _target_logits(list(history) + tree.path_tokens(node)).argsort(descending=True).tolist()
            nxt += [tree.add(node, t) for t in (order[0], order[-1], order[1])]
        frontier = nxt[:4]
    logits = torch.stack([_target_logits(list(history) + tree.path_tokens(n)) for n in range(len(tree))])
    return tree, logits


def _round(sampler: Sampler, history: list[int]) -> list[int]:
    """One verification round: the accepted tokens and the target's own token after them."""
    tree, logits = _tree_and_logits(tuple(history))
    nodes, bonus = verify_tree(tree, logits, sampler, history)
    return [tree.tokens[n] for n in nodes] + [bonus]


def _exact(params: SamplingParams, context: list[int]) -> torch.Tensor:
    probs, ids = Sampler(params).distribution(_target_logits(context), context)
    return torch.zeros(VOCAB, dtype=torch.float64).index_add_(0, ids, probs.double())


@pytest.mark.slow
@pytest.mark.parametrize("params", PARAMS)
def test_first_and_second_tokens_follow_the_target_distribution(params):
    sampler = Sampler(SamplingParams(**{**params.__dict__, "seed": 1234}))
    counts = torch.zeros(2, VOCAB, dtype=torch.float64)
    for _ in range(DRAWS):
        tokens = _round(sampler, HISTORY)
        if len(tokens) == 1:
            tokens += _round(sampler, HISTORY + tokens)
        counts[0, tokens[0]] += 1
        counts[1, tokens[1]] += 1
    p1 = _exact(params, HISTORY)
    p2 = sum(p1[x] * _exact(params, HISTORY + [x]) for x in range(VOCAB) if p1[x] > 0)
    for freq, p in zip(counts / DRAWS, (p1, p2)):
        bound = 5 * torch.sqrt(p * (1 - p) / DRAWS) + 1e-9
        assert torch.all((freq - p).abs() <= bound), (freq, p)

    tree, _ = _tree_and_logits(tuple(HISTORY))
    accepted = sum(counts[0, t] for t in tree.children[0])
    assert accepted > DRAWS / 2  # mostly candidates accepted, not tokens drawn after rejecting them all


def test_greedy_verification_follows_the_argmax():
    sampler = Sampler(SamplingParams(temperature=0.0, repetition_penalty=1.0))
    history = list(HISTORY)
    tokens = _round(sampler, history)
    assert len(tokens) == 4  # the argmax is a candidate at every level: three accepted, then the bonus
    for i, token in enumerate(tokens):
        assert token == int(_target_logits(history + tokens[:i]).argmax())
