"""The decode step's Triton kernels (llama/fused_triton.py) against their torch references (llama/fused_ops.py)
on fresh random inputs, fp16 and bf16, odd sizes; and decode steps through them choosing the tokens the
references choose, with graphs on and off."""
from __future__ import annotations

import pytest
import torch
from fixtures import random_state, tiny_args

from engine.fused_projections import fuse_projections
from llama import fused_ops
from llama.decode_graphs import DecodeSteps
from llama.fused_triton import kernels
from llama.kv_cache import KVCache
from llama.model import Transformer, rope_rotation

pytestmark = pytest.mark.cuda

DTYPES = [torch.float16, torch.bfloat16]
# Against a float32 reference on upcast inputs: the kernels round once, the dtype's own references per op.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


@pytest.fixture(autouse=True)
def triton_present():
    pytest.importorskip("triton")
    assert kernels() is not None


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not a.isnan().any()
    return float((a.double() - b.double()).norm() / b.double().norm())


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 4096), (2, 3, 1000), (7, 96)])
def test_add_rms_norm_and_rms_norm_match_the_references(dtype, shape):
    x, delta = _randn(*shape, dtype=dtype, seed=1), _randn(*shape, dtype=dtype, seed=2)
    w = _randn(shape[-1], dtype=dtype, seed=3)
    assert fused_ops.kernels_for(x)
    h, normed = fused_ops.add_rms_norm(x, delta, w, 1e-5)
    ref_h, ref_normed = fused_ops.add_rms_norm_reference(x.float(), delta.float(), w.float(), 1e-5)
    assert torch.equal(h, (x + delta))  # one rounding of the float32 sum, as torch's add rounds
    assert _rel(normed, ref_normed) < TOL[dtype] and _rel(h, ref_h) < TOL[dtype]
    assert _rel(fused_ops.rms_norm(x, w, 1e-5), fused_ops.rms_norm_reference(x.float(), w.float(), 1e-5)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, width", [(1, 11008), (5, 1500), (3, 7)])
def test_silu_mul_of_a_fused_projections_halves_matches_the_reference(dtype, rows, width):
    gate_up = _randn(rows, 1, 2 * width, dtype=dtype, seed=width)
    gate, up = gate_up.chunk(2, dim=-1)  # views with a row stride of 2 * width
    out = fused_ops.silu_mul(gate, up)
    assert _rel(out, fused_ops.silu_mul_reference(gate.float(), up.float())) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, seqlen, n_heads, n_kv, head_dim", [(1, 1, 32, 32, 128), (3, 5, 6, 2, 64),
                                                                    (2, 8, 4, 1, 16)])
@pytest.mark.parametrize("tree", [False, True])  # one rotation per row, or one shared by the rows (a tree's)
def test_rope_store_rotates_q_and_writes_k_v_at_the_slots_only(dtype, batch, seqlen, n_heads, n_kv, head_dim, tree):
    capacity, slots_n = 300, batch + 1
    heads = _randn(batch, seqlen, n_heads + 2 * n_kv, head_dim, dtype=dtype, seed=seqlen)
    gen = torch.Generator().manual_seed(batch * 7 + seqlen)
    positions = torch.randint(0, capacity, (1 if tree else batch, seqlen), generator=gen)
    slots = torch.stack([torch.randperm(capacity, generator=gen)[:seqlen] for _ in range(batch)]).cuda()
    angles = torch.rand(capacity, head_dim // 2, generator=gen) * 50
    rotation = rope_rotation(angles.cos()[positions].cuda(), angles.sin()[positions].cuda(), dtype)
    keys = _randn(slots_n, n_kv, capacity, head_dim, dtype=dtype, seed=11)  # random: unwritten places must stay
    values = _randn(slots_n, n_kv, capacity, head_dim, dtype=dtype, seed=12)
    ref_keys, ref_values = keys.float(), values.float()
    q = fused_ops.rope_store(heads, n_heads, rotation, keys, values, slots)
    ref_rotation = (rotation[0].float(), rotation[1].float())
    ref_q = fused_ops.rope_store_reference(heads.float(), n_heads, ref_rotation, ref_keys, ref_values, slots)
    assert _rel(q, ref_q) < TOL[dtype]
    assert torch.equal(values.float(), ref_values)  # copied, not computed
    written = torch.zeros(slots_n, capacity, dtype=torch.bool)
    written[torch.arange(batch)[:, None], slots.cpu()] = True
    written = written.cuda()
    by_place, ref_by_place = keys.transpose(1, 2), ref_keys.transpose(1, 2)  # (slots, capacity, n_kv, head_dim)
    assert torch.equal(by_place[~written].float(), ref_by_place[~written])
    assert _rel(by_place[written], ref_by_place[written]) < TOL[dtype]


ATTENTION_SHAPES = [(1, 1, 32, 32, 256), (1, 1, 8, 2, 1000), (3, 4, 6, 3, 77), (2, 1, 4, 4, 5000), (1, 8, 2, 2, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch, seqlen, n_heads, n_kv, kv_len", ATTENTION_SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_split_attention_matches_the_reference(dtype, batch, seqlen, n_heads, n_kv, kv_len, masked):
    head_dim = 64 if n_heads != 32 else 128
    q = _randn(batch, seqlen, n_heads, head_dim, dtype=dtype, seed=kv_len)
    cache = _randn(2, batch + 1, n_kv, kv_len + 13, head_dim, dtype=dtype, seed=kv_len + 1)
    keys, values = cache[0, :batch, :, :kv_len], cache[1, :batch, :, :kv_len]  # views of a larger cache
    mask = None
    if masked:
        gen = torch.Generator().manual_seed(kv_len)
        visible = torch.rand(batch, seqlen, kv_len, generator=gen) < 0.3
        visible[..., kv_len // 2] = True  # every query sees at least one key
        mask = torch.zeros(batch, seqlen, kv_len, dtype=dtype).masked_fill_(~visible, float("-inf")).cuda()
    ref = fused_ops.attention_reference(q.float(), keys.float(), values.float(),
                                        None if mask is None else mask.float())
    for block, programs, warps in [(32, 1024, 2), (16, 64, 1), (64, 4096, 4)]:  # one split up to many
        out = fused_ops.attention(q, keys, values, mask, block=block, programs=programs, warps=warps)
        assert out.shape == (batch, seqlen, n_heads * head_dim)
        assert _rel(out, ref) < TOL[dtype]
        two = fused_ops.attention(q, keys, values, mask, block=block, programs=programs, warps=warps, one_launch=False)
        assert _rel(two, ref) < TOL[dtype]  # the splits combined by a second launch
    assert not fused_ops._arrivals(q.device).any()  # the one-launch counters are left zero for the next launch


def test_one_launch_attention_replays_in_a_graph_on_new_inputs():
    """Its arrival counters are reset by the launch itself: replays (and eager calls between them) keep combining."""
    q = _randn(2, 1, 8, 64, dtype=torch.float16, seed=3)
    cache = _randn(2, 2, 4, 700, 64, dtype=torch.float16, seed=4)
    keys, values = cache[0], cache[1]
    fused_ops.attention(q, keys, values, None)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_ops.attention(q, keys, values, None)
    for seed in range(3):
        q.copy_(_randn(2, 1, 8, 64, dtype=torch.float16, seed=10 + seed))
        graph.replay()
        eager = fused_ops.attention(q, keys, values, None)
        torch.cuda.synchronize()
        assert torch.equal(out, eager), seed
        assert _rel(out, fused_ops.attention_reference(q.float(), keys.float(), values.float(), None)) < 1e-2


def _tiny_model(dtype: torch.dtype) -> Transformer:
    args = tiny_args("llama", max_seq_len=600, vocab_size=300, dim=128, n_heads=4, n_kv_heads=2, ffn_dim=320)
    model = Transformer(args)
    model.load_state_dict(random_state(args, seed=9), strict=False)
    model = model.to("cuda", dtype).eval()
    fuse_projections(model)
    return model


def _decode(
    model: Transformer, dtype: torch.dtype, capture: bool, forced: list[int] | None = None, n: int = 40
) -> tuple[list[int], torch.Tensor]:
    """Greedy decode through DecodeSteps from a prompt of 240 (across the 256 bucket's end): tokens, logits.
    forced: feed these tokens instead of the argmax (the same inputs for two paths to be compared)."""
    cache = KVCache(model.args, 600, dtype, "cuda")
    prompt = torch.randint(3, 300, (1, 240), generator=torch.Generator().manual_seed(2)).cuda()
    token = int(model(prompt, 0, cache, last_only=True)[0, -1].argmax())
    steps = DecodeSteps(model, cache, capture=capture)
    tokens, logits = [], []
    for i, pos in enumerate(range(240, 240 + n)):
        tokens.append(token if forced is None else forced[i])
        out = steps.decode(tokens[-1], pos)
        logits.append(out.logits[0, -1].float().clone())
        token = int(out.argmax[0, -1])
    return tokens, torch.stack(logits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@torch.inference_mode()
def test_fused_steps_choose_the_references_tokens_with_graphs_on_and_off(dtype):
    model = _tiny_model(dtype)
    on, on_logits = _decode(model, dtype, capture=True)
    off, off_logits = _decode(model, dtype, capture=False)
    with fused_ops.references_only():
        ref, ref_logits = _decode(model, dtype, capture=False)
    assert on == off and torch.equal(on_logits, off_logits)  # the same kernels, captured or not
    assert on == ref
    assert _rel(on_logits, ref_logits) < 2 * TOL.get(dtype, 1e-4)


@torch.inference_mode()
def test_bfloat16_fused_steps_match_graphs_off_and_the_references_logits():
    """bfloat16 rounds the references' per-op results coarsely enough that a near-tie can flip (it did at the
    12th token): the tokens are compared captured vs not, the logits vs the references on the same tokens."""
    model = _tiny_model(torch.bfloat16)
    on, on_logits = _decode(model, torch.bfloat16, capture=True)
    off, off_logits = _decode(model, torch.bfloat16, capture=False)
    with fused_ops.references_only():
        _, ref_logits = _decode(model, torch.bfloat16, capture=False, forced=on)
    assert on == off and torch.equal(on_logits, off_logits)
    assert _rel(on_logits, ref_logits) < 2 * TOL[torch.bfloat16]
