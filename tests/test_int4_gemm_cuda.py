"""The Triton int4 matmul (dequantized inside the kernel) against the twin's dequantized weight, on fresh
random weights and inputs, and the dispatch that sends token trees and prefill to it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import offload.kernels.matmul as matmul
from offload.kernels.int4_format import quantize_int4
from offload.kernels.int4_gemm_triton import _kernel, int4_gemm

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# The products are those of the twin's weight (the same rounding to the dtype), exact in float32; only the
# order of the float32 sums differs, then one rounding to the dtype: a few of its steps in all.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def triton_present():
    pytest.importorskip("triton")
    assert _kernel() is not None  # with Triton present the kernel must be what runs


def _pair(tokens: int, out: int, inp: int, group: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = quantize_int4(torch.randn(out, inp, generator=gen), group, scale_dtype=dtype).to("cuda")
    x = torch.randn(tokens, inp, generator=gen).to("cuda", dtype)
    return x, w


@pytest.mark.parametrize("tokens, out, inp, group", [
    (17, 300, 256, 32),  # tokens past one 16-row tile, outputs past one 128-column tile
    (64, 1000, 576, 64),  # a 576-wide model's groups of 64
    (100, 4096, 1024, 128),
    (256, 512, 4096, 128),
    (20, 136, 96, 32),  # three 16-byte steps along K
    (33, 264, 768, 256),  # groups of 256: steps of 64 bytes, two a group
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemm_equals_the_twins_weight_multiplied(tokens, out, inp, group, dtype):
    x, w = _pair(tokens, out, inp, group, dtype, seed=tokens + out)
    ref = F.linear(x.float(), w.dequantize(dtype).float())
    y = int4_gemm(x, w)
    assert y.dtype == dtype and y.shape == (tokens, out)
    assert float((y.float() - ref).norm() / ref.norm()) < TOLERANCE[dtype]


def test_trees_and_prefill_take_the_kernel_and_decode_sizes_do_not(monkeypatch):
    calls = []
    monkeypatch.setattr(matmul, "int4_gemm", lambda x, w: calls.append(x.shape[0]) or int4_gemm(x, w))
    x, w = _pair(64, 2560, 512, 128, torch.bfloat16, seed=1)
    for tokens in (1, 16, 17, 64):
        ref = matmul.int4_matmul_reference(x[:tokens].float(), w)
        y = matmul.int4_matmul(x[:tokens], w).float()
        assert float((y - ref).norm() / ref.norm()) < 1e-2
    assert calls == [17, 64]  # up to TINYGEMM_MAX_TOKENS rows: tinygemm's layout made per call


def test_groups_the_kernel_cannot_step_through_are_dequantized_instead():
    x, w = _pair(20, 136, 80, 40, torch.float16, seed=3)  # groups of 40: no 16-byte step stays inside one
    ref = matmul.int4_matmul_reference(x.float(), w)
    assert float((matmul.int4_matmul(x, w).float() - ref).norm() / ref.norm()) < 2e-3
