"""Tree attention and KV compaction, against running every branch of the tree on its own."""
from __future__ import annotations

import pytest
import torch
from fixtures import random_state, tiny_args

from llama.kv_cache import KVCache
from llama.model import Transformer
from llama.speculative.tree import TokenTree, tree_attention

CONTEXT = [5, 17, 3, 99, 42, 7, 7, 120, 64, 33, 8]


def _model(**shape) -> Transformer:
    args = tiny_args(**shape)
    model = Transformer(args)
    model.load_state_dict(random_state(args, seed=3), strict=False)
    return model.eval()


def _tree() -> TokenTree:
    """root 9 -> {11 -> {12, 13 -> 14}, 15 -> 16, 12}: siblings, repeated tokens in other branches."""
    tree = TokenTree(9)
    a = tree.add(0, 11)
    b = tree.add(0, 15)
    tree.add(a, 12)
    d = tree.add(a, 13)
    tree.add(b, 16)
    tree.add(d, 14)
    tree.add(0, 12)
    return tree


def _prefilled(model: Transformer) -> KVCache:
    cache = KVCache(model.args, 64, torch.float32)
    with torch.inference_mode():
        model(torch.tensor([CONTEXT]), 0, cache)
    return cache


def _reference_logits(model: Transformer, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0, -1]


ARCHS = [
    pytest.param({}, id="llama"),
    pytest.param({"arch": "mistral", "sliding_window": 6}, id="gqa-sliding-window"),
    pytest.param({"arch": "qwen2"}, id="qwen2-bias"),
]


@pytest.mark.parametrize("shape", ARCHS)
def test_every_node_sees_the_context_and_its_ancestors_only(shape):
    model = _model(**shape)
    cache = _prefilled(model)
    tree, start = _tree(), len(CONTEXT)
    positions, mask = tree_attention(tree, start, window=model.args.sliding_window)
    with torch.inference_mode():
        logits = model(torch.tensor([tree.tokens]), start, cache, positions=positions, mask=mask)[0]
    for node in range(len(tree)):
        branch = CONTEXT + [tree.tokens[0]] + tree.path_tokens(node)
        torch.testing.assert_close(logits[node], _reference_logits(model, branch), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", ARCHS)
def test_kept_path_continues_like_the_branch_run_alone(shape):
    model = _model(**shape)
    cache = _prefilled(model)
    tree, start = _tree(), len(CONTEXT)
    path = [1, 4, 6]  # 11 -> 13 -> 14
    positions, mask = tree_attention(tree, start, window=model.args.sliding_window)
    with torch.inference_mode():
        model(torch.tensor([tree.tokens]), start, cache, positions=positions, mask=mask)
        cache.keep(start + 1, [start + n for n in path])
        end = start + 1 + len(path)
        nxt = model(torch.tensor([[77]]), end, cache)[0, -1]
    branch = CONTEXT + [tree.tokens[n] for n in [0, *path]]
    torch.testing.assert_close(nxt, _reference_logits(model, branch + [77]), atol=2e-5, rtol=1e-5)
    fresh = KVCache(model.args, 64, torch.float32)
    with torch.inference_mode():
        model(torch.tensor([branch]), 0, fresh)
    for kept, ref in zip(cache.keys + cache.values, fresh.keys + fresh.values):
        torch.testing.assert_close(kept[:, :, :end], ref[:, :, :end], atol=2e-5, rtol=1e-5)


def test_tree_levels_run_one_after_another_match_one_pass():
    """A draft expands its tree level by level; each level sees the levels already in the cache."""
    model = _model()
    tree, start = _tree(), len(CONTEXT)
    one, levels = _prefilled(model), _prefilled(model)
    with torch.inference_mode():
        positions, mask = tree_attention(tree, start)
        whole = model(torch.tensor([tree.tokens]), start, one, positions=positions, mask=mask)[0]
        parts = []
        for lo, hi in [(0, 3), (3, 5), (5, len(tree))]:
            positions, mask = tree_attention(tree, start, lo, hi)
            parts.append(model(torch.tensor([tree.tokens[lo:hi]]), start + lo, levels, positions=positions, mask=mask)[0])
    torch.testing.assert_close(torch.cat(parts), whole, atol=2e-5, rtol=1e-5)


def test_tree_structure():
    tree = _tree()
    assert tree.add(0, 11) == 1 and len(tree) == 8  # an existing child is found, not added
    assert tree.path_tokens(6) == [11, 13, 14]
    assert tree.depths == [0, 1, 1, 2, 2, 2, 3, 1]
    anc = tree.ancestors()
    assert anc[6].nonzero().flatten().tolist() == [0, 1, 4, 6]
    assert anc[5].nonzero().flatten().tolist() == [0, 2, 5]
    assert torch.equal(tree.ancestors(3, 6), anc[3:6, :6])  # the rows a draft level needs, its columns so far
    chain = TokenTree(1)
    chain.add_path(0, [2, 3, 4, 5], budget=3)
    assert chain.tokens == [1, 2, 3]
