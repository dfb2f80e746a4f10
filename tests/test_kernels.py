"""Quantized formats and matmul kernels against their pure-torch references (fresh random inputs each test).

Tolerances are relative errors ||y - ref|| / ||ref||. Kernels and references both accumulate in float32,
so kernel-vs-reference error is set by rounding the output to the activation dtype.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from offload.errors import FormatError
from offload.kernels import (
    Int4CudaWeight,
    Int4Weight,
    Int8Weight,
    cpu_extension,
    int4_matmul,
    int4_matmul_reference,
    int8_matmul,
    int8_matmul_reference,
    prepare_for_cuda,
    quantize_int4,
    quantize_int8,
    tinygemm_supports,
)
from offload.kernels.decode_block import int8_rounded_activations
from offload.kernels.int4_format import pack_int4
from offload.kernels.tinygemm import tinygemm_scales_and_zeros

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 6e-3}
TOKENS = (1, 3, 17)
REPO = Path(__file__).resolve().parents[1]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


@pytest.fixture(scope="module", autouse=True)
def built_extension() -> None:
    assert cpu_extension() is not None, "the CPU kernels did not build on this machine"


# -- formats ------------------------------------------------------------------------------------------


def test_int8_quantization_error_on_gaussian_weights() -> None:
    w = torch.randn(256, 4096)
    q = quantize_int8(w)
    assert q.qweight.dtype == torch.int8 and q.scale.shape == (256,)
    assert q.qweight.abs().amax(dim=1).eq(127).all()  # each row uses the full range
    assert rel_err(q.dequantize(), w) < 0.01


def test_int4_quantization_error_on_gaussian_weights() -> None:
    w = torch.randn(256, 4096)
    q = quantize_int4(w, group_size=128)
    assert q.packed.shape == (256, 2048) and q.scales.shape == (256, 32) and q.group_size == 128
    assert torch.equal(q.zeros, q.zeros.round()) and q.zeros.min() >= 0 and q.zeros.max() <= 15
    assert rel_err(q.dequantize(), w) < 0.12


def test_int4_packing_puts_even_index_in_high_nibble() -> None:
    q = torch.tensor([[1, 2, 15, 0], [7, 8, 3, 12]], dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.tolist() == [[0x12, 0xF0], [0x78, 0x3C]]
    fmt = Int4Weight(packed=packed, scales=torch.ones(2, 1), zeros=torch.zeros(2, 1))
    assert torch.equal(fmt.unpack(), q)


def test_int4_group_size_falls_back_to_half_then_a_quarter() -> None:
    assert quantize_int4(torch.randn(8, 192), group_size=128).group_size == 64
    assert quantize_int4(torch.randn(8, 160), group_size=128).group_size == 32
    with pytest.raises(FormatError, match="1000"):
        quantize_int4(torch.randn(8, 1000), group_size=128)  # 1000 = 8 x 125
    assert quantize_int4(torch.randn(8, 64), group_size=128).group_size == 64  # narrower layer: one group


def test_int4_scales_follow_the_weight_dtype() -> None:
    w = torch.randn(16, 256, dtype=torch.bfloat16)
    q = quantize_int4(w)
    assert q.scales.dtype == q.zeros.dtype == torch.bfloat16
    assert rel_err(q.dequantize(), w) < 0.12


def test_formats_reject_wrong_tensors() -> None:
    with pytest.raises(ValueError, match="qweight must be int8"):
        Int8Weight(qweight=torch.zeros(4, 8), scale=torch.ones(4))
    with pytest.raises(ValueError, match="scale must be float"):
        Int8Weight(qweight=torch.zeros(4, 8, dtype=torch.int8), scale=torch.ones(5))
    with pytest.raises(ValueError, match="zeros must match"):
        Int4Weight(packed=torch.zeros(4, 8, dtype=torch.uint8), scales=torch.ones(4, 2), zeros=torch.ones(4, 3))
    with pytest.raises(ValueError, match="needs tensors"):
        Int8Weight.from_tensors({"qweight": torch.zeros(4, 8, dtype=torch.int8)})


def test_tensors_round_trip_through_a_shared_byte_buffer() -> None:
    """The engine's use: every tensor copied into one uint8 buffer, the format rebuilt from views of it."""
    w = torch.randn(67, 384)
    x = torch.randn(3, 384)
    for fmt in (quantize_int8(w), quantize_int4(w, 128, torch.bfloat16)):
        tensors = fmt.tensors()
        pool = torch.empty(sum(t.numel() * t.element_size() for t in tensors.values()), dtype=torch.uint8)
        views, offset = {}, 0
        for name, t in tensors.items():
            n = t.numel() * t.element_size()
            pool[offset:offset + n].copy_(t.reshape(-1).view(torch.uint8))
            views[name] = pool[offset:offset + n].view(t.dtype).view(t.shape)
            offset += n
        rebuilt = type(fmt).from_tensors(views)
        assert rebuilt.nbytes() == fmt.nbytes() == pool.numel()
        matmul = int8_matmul if isinstance(fmt, Int8Weight) else int4_matmul
        assert torch.equal(matmul(x, rebuilt), matmul(x, fmt))


# -- CPU kernels --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", [(67, 384), (67, 389), (5, 16)])
def test_cpu_int8_matmul_matches_reference(dtype: torch.dtype, tokens: int, shape: tuple[int, int]) -> None:
    out_f, in_f = shape
    w = quantize_int8(torch.randn(out_f, in_f))
    x = torch.randn(tokens, in_f).to(dtype)
    y = int8_matmul(x, w)
    assert y.dtype == dtype and y.shape == (tokens, out_f)
    assert rel_err(y, F.linear(x.float(), w.dequantize())) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", [(67, 384, 128), (67, 384, 32), (67, 120, 40), (9, 24, 8)])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_int4_matmul_matches_reference(
    dtype: torch.dtype, tokens: int, shape: tuple[int, int, int], scale_dtype: torch.dtype
) -> None:
    """The avx512_vnni path (where this CPU has it, the shape fits and there are at most 8 tokens) reads x
    rounded to int8 per 32 values: then the reference is fed that rounding (tests/test_decode_block.py holds
    each path)."""
    out_f, in_f, group = shape  # group 40 and 8 exercise the scalar tail of a group
    w = quantize_int4(torch.randn(out_f, in_f), group, scale_dtype)
    x = torch.randn(tokens, in_f).to(dtype)
    y = int4_matmul(x, w)
    assert y.dtype == dtype and y.shape == (tokens, out_f)
    rounds = cpu_extension().int4_rounds_activations(in_f, w.group_size, tokens)
    xr = int8_rounded_activations(x.float()) if rounds else x.float()
    assert rel_err(y, F.linear(xr, w.dequantize())) < TOL[dtype]


def test_cpu_matmuls_take_batched_and_strided_activations() -> None:
    w8, w4 = quantize_int8(torch.randn(40, 256)), quantize_int4(torch.randn(40, 256), 64)
    x = torch.randn(2, 5, 512)[..., ::2]  # (batch, seq, in), not contiguous
    for matmul, ref, w in ((int8_matmul, int8_matmul_reference, w8), (int4_matmul, int4_matmul_reference, w4)):
        y = matmul(x, w)
        assert y.shape == (2, 5, 40)
        assert rel_err(y, ref(x, w)) < TOL[torch.float32]


def test_cpu_kernels_reject_mismatched_shapes() -> None:
    ext = cpu_extension()
    w = quantize_int8(torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="x has 32 features but qweight has 64"):
        ext.int8_matmul(torch.randn(1, 32), w.qweight, w.scale)
    w4 = quantize_int4(torch.randn(8, 64), 32)
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16"):
        ext.int4_matmul(torch.randn(1, 64).double(), w4.packed, w4.scales, w4.zeros)


def test_reference_path_when_the_extension_cannot_build(tmp_path: Path) -> None:
    """A missing compiler: one warning, a progress line, and results equal to the reference."""
    script = textwrap.dedent("""
        import warnings
        import torch
        from offload.kernels import (int4_matmul, int4_matmul_reference, int8_matmul, int8_matmul_reference,
                                     quantize_int4, quantize_int8)
        w = torch.randn(24, 128)
        x = torch.randn(2, 128)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            w8, w4 = quantize_int8(w), quantize_int4(w, 64)
            assert torch.equal(int8_matmul(x, w8), int8_matmul_reference(x, w8))
            assert torch.equal(int4_matmul(x, w4), int4_matmul_reference(x, w4))
            assert torch.equal(int8_matmul(x, w8), int8_matmul_reference(x, w8))
        print("warnings:", sum("CPU kernels unavailable" in str(c.message) for c in caught))
    """)
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"),
               PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "warnings: 1" in done.stdout
    assert "compiling CPU kernels" in done.stderr


# -- tinygemm (CUDA int4) -----------------------------------------------------------------------------


def test_tinygemm_scales_and_zeros_convention_on_cpu_op() -> None:
    """torch's CPU twin of tinygemm uses the same (q - 8) * scale + zero layout: check our conversion."""
    w = quantize_int4(torch.randn(64, 256), 128, torch.bfloat16)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.unpack().int(), 2)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 128, tinygemm_scales_and_zeros(w))
    assert rel_err(y, F.linear(x.float(), w.dequantize())) < 1e-2


def test_tinygemm_pairs_from_bfloat16_equal_the_float32_formula() -> None:
    """Streamed (bfloat16) scales and zeros take a three-launch path: the same bits as computing in float32."""
    g = torch.Generator().manual_seed(5)
    scales = (torch.rand(48, 12, generator=g) * 0.1 + 1e-3).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (48, 12), generator=g).float()  # ours and GGUF Q4_0: whole levels
    zeros[:24] = torch.rand(24, 12, generator=g) * 30 - 7  # GGUF Q4_1: -m / d, any fraction
    w = Int4Weight(packed=torch.zeros(48, 192, dtype=torch.uint8), scales=scales, zeros=zeros.to(torch.bfloat16))
    s, z = w.scales.float(), w.zeros.float()
    expected = torch.stack([s, s * (8.0 - z)], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    got = tinygemm_scales_and_zeros(w)
    assert got.shape == (12, 48, 2) and got.is_contiguous()
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))


def test_tinygemm_shape_limits() -> None:
    assert tinygemm_supports(quantize_int4(torch.randn(72, 384), 128))
    assert not tinygemm_supports(quantize_int4(torch.randn(67, 384), 128))  # out not a multiple of 8
    assert not tinygemm_supports(quantize_int4(torch.randn(72, 120), 40))  # group size not 32..256
    with pytest.raises(ValueError, match="tinygemm cannot take"):
        prepare_for_cuda(quantize_int4(torch.randn(67, 384), 128), "cpu")
    host_copy = Int4CudaWeight(weight_int4pack=torch.zeros(9, 3, 32, 4, dtype=torch.int32),
                               scales_and_zeros=torch.zeros(3, 72, 2, dtype=torch.bfloat16))
    assert (host_copy.out_features, host_copy.in_features, host_copy.group_size) == (72, 384, 128)
    with pytest.raises(ValueError, match="on CUDA only"):
        int4_matmul(torch.randn(1, 384), host_copy)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("group", [32, 128])
def test_cuda_tinygemm_matches_reference(dtype: torch.dtype, tokens: int, group: int) -> None:
    w = quantize_int4(torch.randn(72, 384), group, torch.bfloat16)
    x = torch.randn(tokens, 384).to(dtype)
    ref = F.linear(x.float(), w.dequantize())
    prepared = prepare_for_cuda(w, "cuda")
    y = int4_matmul(x.cuda(), prepared)
    assert y.dtype == dtype and y.shape == (tokens, 72)
    assert rel_err(y.cpu(), ref) < 2e-2  # bfloat16 activations and bfloat16 (scale, zero) pairs
    # streamed: the prepared tensors go to pinned host memory and come back unchanged
    pinned = {n: t.cpu().pin_memory() for n, t in prepared.tensors().items()}
    again = type(prepared).from_tensors({n: t.to("cuda", non_blocking=True) for n, t in pinned.items()})
    assert torch.equal(int4_matmul(x.cuda(), again), y)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
def test_cuda_int8_and_unprepared_int4_match_reference(dtype: torch.dtype, tokens: int) -> None:
    w = torch.randn(67, 384)
    x = torch.randn(tokens, 384).to(dtype)
    tol = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1e-2}[dtype]  # weights rounded to dtype
    w8, w4 = quantize_int8(w), quantize_int4(w, 128)
    assert rel_err(int8_matmul(x.cuda(), w8.to("cuda")).cpu(), F.linear(x.float(), w8.dequantize())) < tol
    assert rel_err(int4_matmul(x.cuda(), w4.to("cuda")).cpu(), F.linear(x.float(), w4.dequantize())) < tol
