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


def test_launch_shapes_do_not_change_a_bit():
    x, w = _pair(1000, 4096, 128, torch.bfloat16, seed=5)
    results = [int4_gemv(x, w, shape) for shape in int4_gemv_cuda.SHAPES]
    assert all(torch.equal(r, results[0]) for r in results[1:])


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
        assert all(torch.equal(int4_gemv(x, w, shape, **extra), got) for shape in int4_gemv_cuda.SHAPES), name
