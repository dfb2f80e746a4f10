"""A token tree through the CPU decode stack (DecodeStack.tree_step): every node's logits, key and value are bit
for bit what one-token steps down its path give, in every weight format, with grouped heads and a sliding
window. That is what makes greedy speculative decoding on the CPU give plain greedy's tokens exactly."""
from __future__ import annotations

import pytest
import torch
from fixtures import random_state, tiny_args
from speculative_testing import speculating
from tiny_model import GREEDY, build_tiny_engine, make_tiny_model_dir

from engine.cpu_decode import CpuDecodeModel, use_cpu_decode_blocks
from llama.kv_cache import KVCache
from llama.model import Transformer
from llama.sampling import Sampler
from llama.speculative.planner import TreeShape
from llama.speculative.tree import TokenTree, tree_attention
from offload.kernels import cpu_extension
from offload.kernels.few_token_linear import FEW_TOKENS
from offload.kernels.linear import quantize_linears
from offload.quant_mode import QuantMode

PROMPT = [1, 5, 9, 33, 7, 81, 2, 40, 17]
CTX = 64


@pytest.fixture(scope="module", autouse=True)
def built_extension() -> None:
    assert cpu_extension() is not None, "the CPU kernels did not build on this machine"


def fused_model(arch: str, fmt: str, **shape) -> Transformer:
    args = tiny_args(arch, dim=128, ffn_dim=320, **shape)
    model = Transformer(args)
    model.load_state_dict(random_state(args, seed=3), strict=False)
    model = model.to(torch.bfloat16 if fmt == "bfloat16" else torch.float32).eval()
    if fmt in ("int8", "int4"):
        quantize_linears(model.layers, QuantMode(fmt), progress=False, group_size=32)
    assert use_cpu_decode_blocks(model) == args.n_layers
    assert isinstance(model, CpuDecodeModel)
    return model


def branching_tree() -> TokenTree:
    """Eight nodes: the root (the last sampled token), two branches of depth 3 and 2, and side leaves."""
    tree = TokenTree(11)
    tree.add_path(0, [21, 31, 41], FEW_TOKENS)
    tree.add_path(0, [22, 32], FEW_TOKENS)
    tree.add(1, 33)
    tree.add(2, 44)
    assert len(tree) == FEW_TOKENS
    return tree


def prefilled(model: Transformer) -> KVCache:
    cache = KVCache(model.args, CTX, next(model.parameters()).dtype)
    with torch.inference_mode():
        model(torch.tensor([PROMPT]), 0, cache)
    return cache


def path_of(tree: TokenTree, node: int) -> list[int]:
    path = [node]
    while path[-1] > 0:
        path.append(tree.parents[path[-1]])
    return path[::-1]  # root .. node


@pytest.mark.parametrize("arch, fmt, window", [
    ("llama", "float32", None), ("llama", "bfloat16", None), ("mistral", "int8", None), ("qwen2", "int4", None),
    ("mistral", "float32", 6),
])
def test_each_tree_node_is_its_one_token_step_bit_for_bit(arch, fmt, window):
    model = fused_model(arch, fmt, **({"sliding_window": window} if window else {}))
    tree, start = branching_tree(), len(PROMPT)
    positions, mask = tree_attention(tree, start, window=window)
    cache = prefilled(model)
    with torch.inference_mode():
        tree_logits = model(torch.tensor([tree.tokens]), start, cache, positions=positions, mask=mask)[0]
    for node in range(len(tree)):
        alone = prefilled(model)
        with torch.inference_mode():
            for depth, n in enumerate(path_of(tree, node)):
                step_logits = model(torch.tensor([[tree.tokens[n]]]), start + depth, alone)[0, -1]
        assert torch.equal(tree_logits[node], step_logits), f"node {node}"
        for layer in range(model.args.n_layers):
            for tree_kv, alone_kv in ((cache.keys, alone.keys), (cache.values, alone.values)):
                assert torch.equal(tree_kv[layer][0, :, start + node], alone_kv[layer][0, :, start + depth])


def test_a_tree_attends_only_what_its_mask_shows():
    """A token that sees only the context and itself is the root's one-token step whatever its siblings hold."""
    model = fused_model("llama", "float32")
    start = len(PROMPT)
    tree = TokenTree(11)
    for token in (12, 13, 14):  # three children of the root: siblings, none seeing another
        tree.add(0, token)
    positions, mask = tree_attention(tree, start)
    with torch.inference_mode():
        logits = model(torch.tensor([tree.tokens]), start, prefilled(model), positions=positions, mask=mask)[0]
        swapped = TokenTree(11)
        for token in (14, 13, 12):
            swapped.add(0, token)
        again = model(torch.tensor([swapped.tokens]), start, prefilled(model), positions=positions, mask=mask)[0]
    assert torch.equal(logits[1], again[3]) and torch.equal(logits[3], again[1]) and torch.equal(logits[2], again[2])


@pytest.mark.parametrize("overrides", [{}, {"dtype": "bfloat16"}, {"quant": QuantMode.INT4}])
def test_speculative_greedy_on_the_cpu_passes_its_trees_through_the_stack(tmp_path, monkeypatch, overrides):
    """The engine app.py builds on the CPU: trees of 7 tokens (depth 3, width 2) go through tree_step, and the
    reply is plain greedy's, token for token."""
    prompt = "The quick brown fox jumps over the lazy dog. The quick brown fox"
    plain_engine = build_tiny_engine(tmp_path, **overrides)
    ids = plain_engine.tokenizer.encode(prompt, bos=True)
    plain = plain_engine.generator.generate(ids, Sampler(GREEDY), 24, stop_ids=set()).token_ids
    trees = []
    real = CpuDecodeModel._tree_through_blocks
    monkeypatch.setattr(CpuDecodeModel, "_tree_through_blocks",
                        lambda self, *a: trees.append(a[1].shape[1]) or real(self, *a))
    engine = speculating(build_tiny_engine(tmp_path, **overrides), TreeShape(3, 2), draft=make_tiny_model_dir(tmp_path))
    assert isinstance(engine.model, CpuDecodeModel)
    spec = engine.generator.generate(ids, Sampler(GREEDY), 24, stop_ids=set()).token_ids
    assert spec == plain
    assert TreeShape(3, 2).budget in trees  # the target's passes (the draft's own trees are smaller)
