"""The Triton int4 kernels on CUDA against their torch twins, on fresh random weights: the dequantize bit for
bit, the small-batch matmul within fp16/bf16 accumulation error."""
from __future__ import annotations

import pytest
import torch

from offload.kernels.int4_format import quantize_int4
from offload.kernels.int4_triton import _kernels, dequantize_int4, int4_small_batch, small_batch_supported
from offload.kernels.matmul import int4_matmul, int4_matmul_reference

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def triton_present():
    pytest.importorskip("triton")
    assert _kernels() is not None  # with Triton present the kernels must be what runs


def _weight(out: int, inp: int, group: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return quantize_int4(torch.randn(out, inp, generator=gen), group, scale_dtype=dtype).to("cuda")


@pytest.mark.parametrize("shape, group", [((300, 256), 32), ((4096, 1024), 128), ((1000, 576), 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_equals_the_torch_twin(shape, group, dtype):
    w = _weight(*shape, group, dtype, seed=shape[0] + group)
    assert torch.equal(dequantize_int4(w, dtype), w.dequantize(dtype))


@pytest.mark.parametrize("shape, group", [((4096, 4096), 128), ((1000, 576), 64), ((72, 11008), 32), ((40, 64), 64)])
@pytest.mark.parametrize("tokens", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_small_batch_matmul_matches_the_reference(shape, group, tokens, dtype):
    w = _weight(*shape, group, dtype, seed=tokens + shape[1])
    x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(tokens)).to("cuda", dtype)
    assert small_batch_supported(x, w)
    out = int4_small_batch(x, w)
    assert out.shape == (tokens, shape[0]) and out.dtype == dtype
    y, ref = out.float(), int4_matmul_reference(x.float(), w).float()
    assert float((y - ref).norm() / ref.norm()) < 5e-3
    assert torch.equal(int4_small_batch(x, w), int4_small_batch(x, w))  # a fixed order of the split sums


def test_matmul_dispatch_uses_the_kernels_by_size():
    w = _weight(2560, 512, 128, torch.bfloat16, seed=1)
    for tokens in (1, 64):  # the small-batch kernel, then dequantize + cuBLAS
        x = torch.randn(tokens, 512, generator=torch.Generator().manual_seed(tokens)).to("cuda", torch.bfloat16)
        ref = int4_matmul_reference(x.float(), w).float()
        y = int4_matmul(x, w).float()
        assert float((y - ref).norm() / ref.norm()) < 1e-2
