"""The Triton int4 dequantize on CUDA against its torch twin, bit for bit on fresh random weights, and the
matmul that uses it for prefill-sized inputs."""
from __future__ import annotations

import pytest
import torch

from offload.kernels.int4_format import quantize_int4
from offload.kernels.int4_triton import _kernel, dequantize_int4
from offload.kernels.matmul import int4_matmul, int4_matmul_reference

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def triton_present():
    pytest.importorskip("triton")
    assert _kernel() is not None  # with Triton present the kernel must be what runs


def _weight(out: int, inp: int, group: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return quantize_int4(torch.randn(out, inp, generator=gen), group, scale_dtype=dtype).to("cuda")


@pytest.mark.parametrize("shape, group", [((300, 256), 32), ((4096, 1024), 128), ((1000, 576), 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dequantize_equals_the_torch_twin(shape, group, dtype):
    w = _weight(*shape, group, dtype, seed=shape[0] + group)
    assert torch.equal(dequantize_int4(w, dtype), w.dequantize(dtype))


def test_matmul_dispatch_uses_the_kernel_by_size():
    w = _weight(2560, 512, 128, torch.bfloat16, seed=1)
    for tokens in (1, 64):  # tinygemm's layout made per call, then dequantize + cuBLAS
        x = torch.randn(tokens, 512, generator=torch.Generator().manual_seed(tokens)).to("cuda", torch.bfloat16)
        ref = int4_matmul_reference(x.float(), w).float()
        y = int4_matmul(x, w).float()
        assert float((y - ref).norm() / ref.norm()) < 1e-2
