"""Our one-token int4 kernel (csrc/int4_gemv.cu) against the twin's dequantized weight, on fresh random
weights; its invariance to how rows are shared out; graph capture; and the dispatch and resident layout
that put it on decode steps."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import offload.kernels.matmul as matmul
from offload.kernels import int4_gemv_cuda
from offload.kernels.int4_format import Int4Weight, quantize_int4
from offload.kernels.int4_gemv_cuda import int4_gemv, int4_gemv_library, int4_gemv_supported
from offload.kernels.linear import Int4Linear
from offload.kernels.tinygemm import Int4CudaWeight

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# x is rounded to int8 per 32 inputs (relative error up to 1/254 a value, about 0.2% over a sum of random
# terms), then one rounding to the dtype.
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 1.2e-2}


@pytest.fixture(autouse=True)
def kernel_built(monkeypatch):
    monkeypatch.delenv(int4_gemv_cuda.SWITCH, raising=False)
    int4_gemv_cuda._load_once.cache_clear()
    assert int4_gemv_library() is not None  # nvcc is on the device: the kernel must be what runs
    yield
    int4_gemv_cuda._load_once.cache_clear()


def _pair(out: int, inp: int, group: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, Int4Weight]:
    gen = torch.Generator().manual_seed(seed)
    w = quantize_int4(torch.randn(out, inp, generator=gen), group, scale_dtype=dtype).to("cuda")
    x = torch.randn(1, inp, generator=gen).to("cuda", dtype)
    return x, w


@pytest.mark.parametrize("out, inp, group", [
    (300, 4096, 128),  # outputs not a multiple of any block's rows
    (1000, 11008, 128),  # 344 chunks: 11 warps, the last one part-empty
    (77, 576, 64),  # a 576-wide model's groups of 64
    (136, 96, 32),  # three chunks, one warp mostly idle
    (264, 768, 256),
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemv_equals_the_twins_weight_multiplied(out, inp, group, dtype):
    x, w = _pair(out, inp, group, dtype, seed=out + inp)
    ref = F.linear(x.float(), w.dequantize(torch.float32))
    y = int4_gemv(x, w)
    assert y.dtype == dtype and y.shape == (1, out)
    assert float((y.float() - ref).norm() / ref.norm()) < TOLERANCE[dtype]
    assert float((y.float() - ref).abs().max()) < 4 * TOLERANCE[dtype] * float(ref.abs().max())


def test_every_nibble_meets_its_own_input():
    """One-hot inputs read single weights back: a nibble multiplied by the wrong input would show."""
    inp, out = 256, 16
    q = torch.randint(0, 16, (out, inp), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    w = Int4Weight(packed=(q[:, 0::2] << 4 | q[:, 1::2]).cuda(), scales=torch.ones(out, 2, dtype=torch.bfloat16,
                   device="cuda"), zeros=torch.zeros(out, 2, dtype=torch.bfloat16, device="cuda"))
    eye = torch.eye(inp, dtype=torch.bfloat16, device="cuda")
    got = torch.stack([int4_gemv(eye[k : k + 1], w)[0] for k in range(inp)], dim=1)  # [out, in]
    assert torch.equal(got.cpu(), q.to(torch.bfloat16))


def _by_group_size() -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for shape, (_, _, _, warps_a_group) in int4_gemv_cuda.SHAPES.items():
        groups.setdefault(warps_a_group, []).append(shape)
    return groups


def test_launch_shapes_of_one_group_size_give_the_same_bits_and_all_the_product():
    x, w = _pair(1000, 4096, 128, torch.bfloat16, seed=5)
    ref = F.linear(x.float(), w.dequantize(torch.float32))
    assert len(_by_group_size()) > 1
    for shapes in _by_group_size().values():
        results = [int4_gemv(x, w, shape) for shape in shapes]
        assert all(torch.equal(r, results[0]) for r in results[1:]), shapes
        assert float((results[0].float() - ref).norm() / ref.norm()) < TOLERANCE[torch.bfloat16], shapes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inp", [4096, 11008])
def test_each_token_of_a_pass_gets_its_one_token_result_bit_for_bit(dtype, inp):
    """What lets a token tree's matmuls agree with one-token steps: row t of a call of T tokens is the call
    of row t alone, for every T up to MAX_TOKENS, and it is the right product."""
    _, w = _pair(700, inp, 128, dtype, seed=inp)
    xs = torch.randn(int4_gemv_cuda.MAX_TOKENS, inp, generator=torch.Generator().manual_seed(9)).to("cuda", dtype)
    alone = torch.cat([int4_gemv(xs[t : t + 1], w) for t in range(len(xs))])
    ref = F.linear(xs.float(), w.dequantize(torch.float32))
    assert float((alone.float() - ref).norm() / ref.norm()) < TOLERANCE[dtype]
    for tokens in range(2, len(xs) + 1):
        assert torch.equal(int4_gemv(xs[:tokens], w), alone[:tokens]), tokens
    for shape in int4_gemv_cuda.SHAPES:  # every shape, each with its own bits
        alone = torch.cat([int4_gemv(xs[t : t + 1], w, shape) for t in range(len(xs))])
        assert torch.equal(int4_gemv(xs, w, shape), alone), shape
        assert torch.equal(int4_gemv(xs[:3], w, shape), alone[:3]), shape


@pytest.mark.parametrize("tokens", [9, 17, 70])
def test_a_call_of_many_tokens_sums_each_chunk_of_8_as_its_own_call(tokens):
    """An exact token tree's matmul in one launch: past 8 tokens each chunk of 8 is summed as a call of its
    own, so every row is its one-token call's, with a norm, a residual or the gate as well."""
    _, w = _pair(1024, 4096, 128, torch.bfloat16, seed=tokens)
    gen = torch.Generator().manual_seed(tokens)
    xs, res = (torch.randn(tokens, 4096 if i == 0 else 1024, generator=gen).to("cuda", torch.bfloat16) for i in range(2))
    norm = (torch.rand(4096, generator=gen).to("cuda", torch.bfloat16) + 0.5, 1e-5)
    for kw in ({}, {"norm": norm}, {"residual": res}, {"gated": True}):
        alone = torch.cat([int4_gemv(xs[t : t + 1], w, **{k: (v[t : t + 1] if k == "residual" else v)
                                                             for k, v in kw.items()}) for t in range(tokens)])
        assert torch.equal(int4_gemv(xs, w, **kw), alone), kw


def test_an_unaligned_input_gives_the_same_result():
    x, w = _pair(512, 1024, 128, torch.float16, seed=6)
    shifted = torch.empty(1, 1025, dtype=x.dtype, device="cuda")
    shifted[0, 1:] = x[0]
    assert shifted[:, 1:].data_ptr() % 16 != 0
    assert torch.equal(int4_gemv(shifted[:, 1:], w), int4_gemv(x, w))


def test_a_captured_call_replays_on_new_inputs():
    x, w = _pair(2048, 4096, 128, torch.bfloat16, seed=7)
    static = x.clone()
    int4_gemv(static, w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = int4_gemv(static, w)
    fresh = torch.randn_like(x)
    static.copy_(fresh)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, int4_gemv(fresh, w))


def test_one_token_takes_the_kernel_and_resident_weights_keep_the_plain_layout(monkeypatch):
    calls = []
    monkeypatch.setattr(matmul, "int4_gemv", lambda x, w: calls.append(x.shape[0]) or int4_gemv(x, w))
    x, w = _pair(2560, 512, 128, torch.bfloat16, seed=8)
    xs = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    for rows in (x, xs):
        ref = matmul.int4_matmul_reference(rows.float(), w)
        assert float((matmul.int4_matmul(rows, w).float() - ref).norm() / ref.norm()) < 1e-2
    assert calls == [1, 4]
    assert not int4_gemv_supported(x.half(), w)  # x in another dtype than the scales: not this kernel

    layer = Int4Linear.from_linear(nn.Linear(512, 256, bias=False)).to(device="cuda", dtype=torch.bfloat16)
    layer.prepare_for_cuda("cuda")
    assert isinstance(layer.weight_format(), Int4Weight) and not isinstance(layer.weight_format(), Int4CudaWeight)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_norm_a_gate_and_a_residual_ride_along(dtype):
    """RMSNorm(x) * weight before the product, a residual added after it, and SiLU(gate) * up of a stacked
    gate/up weight, each in the launch, against the same computed by torch around the twin's product; each
    token still its one-token call's, whatever the launch shape."""
    inp, out, eps = 1024, 384, 1e-5
    _, w = _pair(out, inp, 128, dtype, seed=21)
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(5, inp, generator=gen).to("cuda", dtype)
    norm_weight = (1 + 0.3 * torch.randn(inp, generator=gen)).to("cuda", dtype)
    residual = torch.randn(5, out, generator=gen).to("cuda", dtype)
    dense = w.dequantize(torch.float32)
    normed = F.rms_norm(x.float(), (inp,), norm_weight.float(), eps)
    gate, up = F.linear(normed, dense).chunk(2, dim=-1)
    cases = {
        "norm": (dict(norm=(norm_weight, eps)), F.linear(normed, dense)),
        "residual": (dict(residual=residual), F.linear(x.float(), dense) + residual.float()),
        "norm + residual": (dict(norm=(norm_weight, eps), residual=residual), F.linear(normed, dense) + residual.float()),
        "norm + gated": (dict(norm=(norm_weight, eps), gated=True), F.silu(gate) * up),
    }
    for name, (extra, ref) in cases.items():
        got = int4_gemv(x, w, **extra)
        assert got.shape == ref.shape, name
        assert float((got.float() - ref).norm() / ref.norm()) < TOLERANCE[dtype], name
        one = [int4_gemv(x[t : t + 1], w, **{k: (v[t : t + 1] if k == "residual" else v) for k, v in extra.items()})
               for t in range(len(x))]
        assert torch.equal(got, torch.cat(one)), name
        same = _by_group_size()[int4_gemv_cuda.SHAPES[int4_gemv_cuda.launch_shape(w.out_features, inp)][3]]
        assert all(torch.equal(int4_gemv(x, w, shape, **extra), got) for shape in same), name
        for shape in int4_gemv_cuda.SHAPES:
            other = int4_gemv(x, w, shape, **extra)
            assert float((other.float() - ref).norm() / ref.norm()) < TOLERANCE[dtype], (name, shape)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_heads, n_kv_heads, head_dim, batch, seqlen", [(4, 2, 64, 3, 1), (6, 6, 32, 1, 5), (2, 1, 128, 2, 2)])
def test_a_qkv_projection_rotates_q_and_k_and_stores_k_and_v(dtype, n_heads, n_kv_heads, head_dim, batch, seqlen):
    """The RoPE epilogue against the projection without it, rounded to the dtype, rotated in float32 op by op
    (what the epilogue does, so bit for bit) and stored where rope_store stores: q comes back, k and v land in
    the cache at each row's slot, nothing else in the cache changes; each token as in its one-token call."""
    from llama import fused_ops
    from llama.model import rope_rotation

    inp, eps, capacity = 256, 1e-5, 16
    out = (n_heads + 2 * n_kv_heads) * head_dim
    _, w = _pair(out, inp, 64, dtype, seed=out + batch)
    gen = torch.Generator().manual_seed(batch * 7 + seqlen)
    x = torch.randn(batch * seqlen, inp, generator=gen).to("cuda", dtype)
    norm = ((1 + 0.2 * torch.randn(inp, generator=gen)).to("cuda", dtype), eps)
    angles = torch.rand(batch, seqlen, head_dim // 2, generator=gen) * 6.0
    rotation = rope_rotation(angles.cos().cuda(), angles.sin().cuda(), dtype)
    cos, sin = fused_ops.rope_factors(rotation, batch, seqlen, head_dim)
    slots = torch.stack([torch.randperm(capacity, generator=gen)[:seqlen] for _ in range(batch)]).cuda()
    keys = torch.randn(batch + 1, n_kv_heads, capacity, head_dim, generator=gen).to("cuda", dtype)
    values = torch.randn_like(keys)
    before_k, before_v = keys.clone(), values.clone()

    q = int4_gemv(x, w, norm=norm, rope=int4_gemv_cuda.RopeStore(n_heads, n_kv_heads, head_dim, cos, sin, slots,
                                                                 keys, values))

    heads = int4_gemv(x, w, norm=norm).view(batch, seqlen, -1, head_dim // 2, 2).float()
    c, s = cos.float()[:, :, None], sin.float()[:, :, None]
    x0, x1 = heads[..., 0], heads[..., 1]
    rotated = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2).to(dtype)  # (b, t, heads, dim)
    assert q.shape == (batch * seqlen, n_heads * head_dim)
    assert torch.equal(q.view(batch, seqlen, n_heads, head_dim), rotated[:, :, :n_heads])
    want_k, want_v = before_k.clone(), before_v.clone()
    rows = torch.arange(batch, device="cuda")[:, None]
    want_k[rows, :, slots] = rotated[:, :, n_heads : n_heads + n_kv_heads]
    want_v[rows, :, slots] = heads.flatten(-2).to(dtype)[:, :, n_heads + n_kv_heads :]
    assert torch.equal(keys, want_k) and torch.equal(values, want_v)
