"""The Triton one-token int4 matmul against the twin's float32 dequantized weight: every candidate config, fp16
and bf16, groups of 32, 64 and 128, and row counts no config's block divides."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from offload.kernels.int4_format import quantize_int4
from offload.kernels.int4_gemv_triton import CANDIDATE_CONFIGS, _kernels, int4_gemv, int4_gemv_supported

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Products of the twin's levels, summed in float32 in another order, then one rounding to the dtype: the max
# error stays within a few of the dtype's steps at the output's largest value.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 8e-3}


@pytest.fixture(autouse=True)
def triton_present():
    pytest.importorskip("triton")
    assert _kernels() is not None  # with Triton present the kernel must be what runs


def _pair(out: int, inp: int, group: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = quantize_int4(torch.randn(out, inp, generator=gen), group, scale_dtype=dtype).to("cuda")
    x = torch.randn(1, inp, generator=gen).to("cuda", dtype)
    return x, w


def _error(y: torch.Tensor, x: torch.Tensor, w) -> float:
    ref = F.linear(x.float(), w.dequantize(torch.float32))
    return float((y.float() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("name", list(CANDIDATE_CONFIGS))
def test_each_config_equals_the_twins_weight_multiplied(name, group):
    x, w = _pair(333, 1408, group, torch.float16, seed=group)  # 333 rows: no block divides them; 11 groups of 128
    assert int4_gemv_supported(x, w)
    y = int4_gemv(x, w, **CANDIDATE_CONFIGS[name]._asdict())
    assert y.dtype == torch.float16 and y.shape == (1, 333)
    assert _error(y, x, w) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("out, inp, group", [(4097, 4096, 128), (1000, 576, 64), (77, 11008, 128), (40, 160, 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_default_config_in_both_dtypes(out, inp, group, dtype):
    x, w = _pair(out, inp, group, dtype, seed=out)
    y = int4_gemv(x, w)
    assert y.dtype == dtype and y.shape == (1, out)
    assert _error(y, x, w) < TOLERANCE[dtype]
    y_flat = int4_gemv(x[0], w)  # x [in] -> [out]
    assert y_flat.shape == (out,) and _error(y_flat[None], x, w) < TOLERANCE[dtype]


def test_only_one_token_of_fp16_or_bf16_is_taken():
    x, w = _pair(64, 256, 128, torch.bfloat16, seed=0)
    assert int4_gemv_supported(x, w) and int4_gemv_supported(x[0], w)
    assert not int4_gemv_supported(x.expand(2, -1), w)
    assert not int4_gemv_supported(x.float(), w)
    assert not int4_gemv_supported(x.cpu(), w)
