"""On the GPU, an exact token tree's pass gives every node the bits of the one-token step at its position
(llama/tree_rows.py), in each mode a user can run: resident with and without graphs, fp16, streamed with and
without exclusions, --quant int8|int4 resident and streamed; on random tiny Llama, Mistral (a sliding window
shorter than the context) and Qwen2 (q/k/v biases) models, whose logits are full of near-ties.

The chain's nodes sit at slots apart from each other (siblings come first), so attention must find each
node's ancestors through its path, and the window must cut where the one-token steps cut it."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fixtures import make_hf_model, tiny_args
from tiny_model import GREEDY, make_tiny_model_dir
from tiny_tokenizer import train_tiny_sentencepiece

from engine.config import DeviceSpec, RunConfig
from llama import fused_ops
from llama.generation import GenerationStats
from llama.speculative.tree import TokenTree, tree_attention, tree_paths
from offload.quant_mode import QuantMode

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

MODES = {
    "resident": {},
    "no_graphs": {"graphs": False},
    "float16": {"dtype": "float16"},
    "offload": {"use_offload": True},
    "offload_exclusion": {"use_offload": True, "offload_exclusion": frozenset({"w1", "w2", "w3"})},
    "int8": {"quant": QuantMode.INT8},
    "int4": {"quant": QuantMode.INT4},
    "offload_int8": {"use_offload": True, "quant": QuantMode.INT8},
    "offload_int4": {"use_offload": True, "quant": QuantMode.INT4},
}
ARCHS = {"llama": {}, "mistral": {"arch": "mistral", "sliding_window": 8}, "qwen2": {"arch": "qwen2"}}
SHAPE = {"vocab_size": 400, "max_seq_len": 256, "ffn_dim": 256}  # int4's 128-wide groups divide every layer
CHAIN = 6  # plain greedy tokens the tree holds as one of its paths


def _model_dir(root: Path, arch: str) -> Path:
    if arch != "qwen2":
        return make_tiny_model_dir(root, ffn_dim=SHAPE["ffn_dim"], **ARCHS[arch])
    model_dir = root / "tiny-qwen2"  # q/k/v biases: an HF checkpoint (Meta's format has none)
    make_hf_model(tiny_args("qwen2", **SHAPE), model_dir)
    train_tiny_sentencepiece(model_dir)
    return model_dir


def _plain_chain(gen, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    """Plain greedy's next CHAIN tokens after prompt, and the logits each one's step gave."""
    logits = gen.prefill(prompt, GenerationStats())
    tokens, steps = [], []
    for _ in range(CHAIN):
        tokens.append(int(logits.argmax()))
        logits = gen._forward([tokens[-1]], len(prompt) + len(tokens) - 1)
        steps.append(logits)
    return tokens, steps


def _tree_with(chain: list[int], vocab: int) -> tuple[TokenTree, list[int]]:
    """A tree whose root is chain[0] and which holds chain as a path, a sibling added before each of its nodes:
    (the tree, the chain's nodes)."""
    tree, nodes = TokenTree(chain[0]), [0]
    for token in chain[1:]:
        tree.add(nodes[-1], (token + 1) % vocab)
        nodes.append(tree.add(nodes[-1], token))
    return tree, nodes


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES)
@torch.inference_mode()
def test_exact_tree_nodes_get_their_one_token_steps_bits(tmp_path, closing_engines, mode, arch):
    model_dir = _model_dir(tmp_path, arch)
    cfg = RunConfig(model_dir=model_dir, device=DeviceSpec("cuda"), dtype="bfloat16", ctx=256, sampling=GREEDY)
    engine = closing_engines(replace(cfg, **MODES[mode]))
    gen = engine.generator
    prompt = [1] + [int(t) for t in torch.randint(3, 400, (13,), generator=torch.Generator().manual_seed(0))]
    chain, want = _plain_chain(gen, prompt)
    gen.cached = list(prompt)  # the tree's root goes where the chain's first token went
    tree, nodes = _tree_with(chain, 400)
    start = len(prompt)
    positions, mask = tree_attention(tree, start, window=gen.model.args.sliding_window)
    got = gen.tree_logits(tree.tokens, start, positions, mask, tree_paths(tree, start)).float().cpu()
    for i, node in enumerate(nodes):
        assert torch.equal(got[node], want[i]), f"node {node} (depth {i}): max diff {(got[node] - want[i]).abs().max()}"


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("context", [3, 40, 700])
def test_attention_over_paths_gives_each_node_a_one_token_calls_bits(context, window):
    """The kernel alone: a node over the tree's slots through its path, against one query over a cache holding
    the context and then the node's path at consecutive positions, as an eager step (kv_len its length) and as
    a graphed one (a larger bucket, the position given)."""
    gen = torch.Generator(device="cuda").manual_seed(context)
    tree = TokenTree(1)
    tree.add_path(0, [2, 3, 4, 5], 20)
    tree.add_path(1, [6, 7], 20)
    tree.add_path(0, [8], 20)
    heads, kv_heads, dim = 8, 4, 64
    kv_len = context + len(tree)
    keys, values = (torch.randn(1, kv_heads, kv_len, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
                    for _ in range(2))
    q = torch.randn(1, len(tree), heads, dim, device="cuda", generator=gen, dtype=torch.bfloat16)
    positions = (context + torch.tensor(tree.depths))[None].cuda()
    paths = tree_paths(tree, context)[None].cuda()
    out = fused_ops.attention(q, keys, values, None, positions, paths, window)
    for node in range(len(tree)):
        slots = list(range(context)) + [s for s in reversed(paths[0, node].tolist()) if s >= 0]
        k, v = keys[:, :, slots].contiguous(), values[:, :, slots].contiguous()
        eager = fused_ops.attention(q[:, node : node + 1], k, v, None, window=window)
        bucket_k, bucket_v = (torch.zeros(1, kv_heads, 1024, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        bucket_k[:, :, : len(slots)], bucket_v[:, :, : len(slots)] = k, v
        graphed = fused_ops.attention(q[:, node : node + 1], bucket_k, bucket_v, None,
                                      torch.tensor([[len(slots) - 1]], device="cuda"), None, window)
        assert torch.equal(out[:, node], eager[:, 0]) and torch.equal(out[:, node], graphed[:, 0]), node
        reference = fused_ops.attention_reference(q[:, node : node + 1], k, v, None, window=window)
        torch.testing.assert_close(out[:, node], reference[:, 0], atol=2e-2, rtol=2e-2)


def test_a_checked_shape_keeps_each_rows_bits_for_other_values():
    """What check_rows found with its random values holds for others: cuBLAS chose its kernel by shape."""
    from llama.dense_row_check import CHUNK, check_rows

    device = torch.device("cuda")
    for out_f, in_f in ((4096, 4096), (11008, 4096), (4096, 11008)):
        rows = check_rows(out_f, in_f, torch.float16, False, device)
        assert rows in (1, CHUNK)
        w = torch.randn(out_f, in_f, device=device, dtype=torch.float16) * 0.02
        x = torch.randn(rows, in_f, device=device, dtype=torch.float16) * 3
        together = torch.nn.functional.linear(x, w)
        for i in range(rows):
            assert torch.equal(together[i], torch.nn.functional.linear(x[i : i + 1].clone(), w)[0])


def test_a_shape_checked_on_cuda_counts_for_its_tensors_on_cuda_0():
    """check_dense_rows gets the device as the engine names it ("cuda"), linear_rows a tensor's ("cuda:0"): one
    GPU, one check (a missed lookup falls back to one row a call: exact, but a host-bound pass)."""
    from llama.dense_row_check import check_rows, checked_rows

    rows = check_rows(4096, 4096, torch.bfloat16, False, torch.device("cuda"))
    here = torch.empty(1, device="cuda").device
    assert here.index is not None
    assert checked_rows(4096, 4096, torch.bfloat16, False, here) == rows
