"""Decode steps over a kv-length bucket (llama/decode_graphs.py), run op by op on the CPU: the same tokens
and logits as the model's plain decode, across a bucket boundary, with a sliding window, and for token trees."""
from __future__ import annotations

import pytest
import torch
from conftest import greedy
from fixtures import random_state, tiny_args

from llama.decode_graphs import MIN_BUCKET, DecodeSteps, kv_bucket
from llama.kv_cache import KVCache
from llama.model import Transformer
from llama.speculative.tree import TokenTree, tree_attention, tree_paths

CAPACITY = 600  # buckets 256, 512, 600


def _model(arch: str, **shape) -> Transformer:
    args = tiny_args(arch, max_seq_len=CAPACITY, **shape)
    model = Transformer(args)
    model.load_state_dict(random_state(args, seed=5), strict=False)
    return model.eval()


def test_buckets_are_powers_of_two_from_the_smallest_up_to_the_capacity():
    assert kv_bucket(1, 4096) == MIN_BUCKET == kv_bucket(256, 4096)
    assert kv_bucket(257, 4096) == 512 and kv_bucket(4096, 4096) == 4096
    assert kv_bucket(513, 600) == 600 and kv_bucket(10, 100) == 100
    with pytest.raises(ValueError, match="overflow"):
        kv_bucket(601, 600)


@pytest.mark.parametrize("arch, shape", [("llama", {}), ("mistral", {"sliding_window": 6}), ("qwen2", {})])
@torch.inference_mode()
def test_steps_decode_as_the_model_does_across_a_bucket_boundary(arch, shape):
    model = _model(arch, **shape)
    prompt = torch.randint(0, 256, (MIN_BUCKET - 6,), generator=torch.Generator().manual_seed(1)).tolist()
    steps_n = 12  # positions 250..261: the step at 256 attends over the next bucket
    expected, expected_logits = greedy(model, prompt, steps_n, max_seq_len=CAPACITY)

    cache = KVCache(model.args, CAPACITY, torch.float32)
    token = int(model(torch.tensor([prompt]), 0, cache, last_only=True)[0, -1].argmax())
    steps = DecodeSteps(model, cache, capture=False)
    tokens, logits = [], []
    for pos in range(len(prompt), len(prompt) + steps_n):
        tokens.append(token)
        out = steps.decode(token, pos)
        logits.append(out.logits[0, -1])
        token = int(out.argmax[0, -1])
    assert tokens == expected
    torch.testing.assert_close(torch.stack(logits[:-1]), expected_logits[1:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("context", [37, CAPACITY - 7])  # padded to 8 nodes; at the end of the cache, not padded
@torch.inference_mode()
def test_a_tree_step_gives_what_the_model_gives_for_the_same_tree(context):
    model = _model("mistral", sliding_window=5)
    prompt = [3 + i % 200 for i in range(context)]
    tree = TokenTree(7)
    tree.add_path(0, [8, 9, 10], 10)
    tree.add_path(1, [11, 12], 10)  # a branch under the first child
    start = len(prompt)
    positions, mask = tree_attention(tree, start, window=5)

    plain = KVCache(model.args, CAPACITY, torch.float32)
    model(torch.tensor([prompt]), 0, plain)
    expected = model(torch.tensor([tree.tokens]), start, plain, positions=positions, mask=mask)[0]

    cache = KVCache(model.args, CAPACITY, torch.float32)
    model(torch.tensor([prompt]), 0, cache)
    out = DecodeSteps(model, cache, capture=False).tree(tree.tokens, start, positions, mask)
    torch.testing.assert_close(out.logits[0], expected, rtol=1e-4, atol=1e-4)
    assert out.argmax[0].tolist() == expected.argmax(-1).tolist()
    for layer in range(model.args.n_layers):  # the nodes' keys went to their slots
        torch.testing.assert_close(cache.keys[layer][:, :, : start + len(tree)], plain.keys[layer][:, :, : start + len(tree)])


@torch.inference_mode()
def test_a_nan_logit_never_wins_the_argmax():
    model = _model("llama")
    with torch.no_grad():
        model.output.weight[17] = float("nan")
    cache = KVCache(model.args, CAPACITY, torch.float32)
    out = DecodeSteps(model, cache, capture=False).decode(5, 0)
    assert out.logits[0, -1, 17].isnan() and int(out.argmax[0, -1]) != 17


@torch.inference_mode()
def test_only_one_token_steps_and_exact_trees_take_the_fused_attention(monkeypatch):
    """The fused RoPE + split attention serves one query a sequence and the target's exact trees (each node must
    get its one-token step's bits); a draft's token trees keep the torch ops (through the kernels, every tree size
    and bucket was another kernel variant, and resident speculation fell behind plain decoding on the H200).
    Kernels are made to look present, and the fused step records its callers."""
    import types

    import llama.model as model_module
    from engine.fused_projections import fuse_projections

    model = _model("llama")
    fuse_projections(model)
    real = model_module.fused_ops
    present = {n: getattr(real, n) for n in dir(real) if not n.startswith("__")} | {"kernels_for": lambda *t: True}
    monkeypatch.setattr(model_module, "fused_ops", types.SimpleNamespace(**present))
    seen = []

    def fused_step(self, x, rotation, cache, layer):
        seen.append(x.shape[1])
        return torch.zeros(*x.shape[:2], self.n_heads * self.head_dim)

    monkeypatch.setattr(model_module.Attention, "_fused_step", fused_step)
    monkeypatch.setattr(model_module.Attention, "_decode_attention", lambda self, q, k, v, mask: torch.zeros_like(q))
    cache = KVCache(model.args, CAPACITY, torch.float32)
    steps = DecodeSteps(model, cache, capture=False)
    steps.decode(5, 0)
    assert seen and set(seen) == {1}
    seen.clear()
    tree = TokenTree(7)
    tree.add_path(0, [8, 9], 10)
    tree.add_path(1, [11], 10)
    positions, mask = tree_attention(tree, 1)
    steps.tree(tree.tokens, 1, positions, mask)
    assert seen == []
    steps.tree(tree.tokens, 1, positions, mask, tree_paths(tree, 1))
    assert seen == [4] * model.args.n_layers
