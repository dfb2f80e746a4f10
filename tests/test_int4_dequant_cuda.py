"""The one-pass int4 dequantize kernel on CUDA against its torch twin: bit for bit, on fresh random weights."""
from __future__ import annotations

import pytest
import torch

from offload.kernels.int4_dequant_cuda import _kernel, dequantize_int4
from offload.kernels.int4_format import quantize_int4
from offload.kernels.matmul import int4_matmul, int4_matmul_reference

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("shape, group", [((300, 256), 32), ((4096, 1024), 128), ((1000, 576), 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_equals_the_torch_twin(shape, group, dtype):
    pytest.importorskip("triton")
    assert _kernel() is not None  # with Triton present the kernel must be what runs
    gen = torch.Generator().manual_seed(shape[0] + group)
    w = quantize_int4(torch.randn(*shape, generator=gen), group, scale_dtype=dtype).to("cuda")
    assert torch.equal(dequantize_int4(w, dtype), w.dequantize(dtype))


def test_prefill_sized_matmul_uses_it_and_stays_close():
    gen = torch.Generator().manual_seed(1)
    w = quantize_int4(torch.randn(2560, 512, generator=gen), 128, scale_dtype=torch.bfloat16).to("cuda")
    x = torch.randn(64, 512, generator=gen).to("cuda", torch.bfloat16)  # more tokens than tinygemm takes
    ref = int4_matmul_reference(x.float(), w).float()
    y = int4_matmul(x, w).float()
    assert float((y - ref).norm() / ref.norm()) < 1e-2
