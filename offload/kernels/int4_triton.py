"""int4 dequantized on the GPU in one Triton pass, for prefill-sized inputs (then multiplied by cuBLAS).

The torch twin (Int4Weight.dequantize) runs ~7 full-size passes through float32 temporaries; on an H200 that
made a streamed int4 pass of more than 16 tokens cost 2.2x a one-token pass. Same arithmetic as the twin
((q - zero) * scale in float32, one rounding to the dtype), so the two agree bit for bit. Without Triton (or
off CUDA) the twin runs. (A Triton small-batch matmul on this layout, tried for decode, read weights at
80-170 GB/s against tinygemm's ~1 TB/s on the H200, so decode stays with tinygemm.)
"""
from __future__ import annotations

import functools

import torch

from offload.kernels.int4_format import Int4Weight

DEQUANT_ROWS, DEQUANT_COLS = 16, 256  # one dequantize program's tile of the output [out, in]


@functools.cache
def _kernel():
    """The compiled Triton dequantize kernel, or None where Triton cannot be imported."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def dequant(packed, scales, zeros, out, n_rows, n_cols, group, p_stride, s_stride,
                ROWS: tl.constexpr, COLS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]  # (ROWS, 1)
        cols = tl.program_id(1) * COLS + tl.arange(0, COLS)[None, :]  # (1, COLS)
        inside = (rows < n_rows) & (cols < n_cols)
        byte = tl.load(packed + rows * p_stride + cols // 2, mask=inside, other=0).to(tl.int32)
        q = (byte >> ((1 - cols % 2) * 4)) & 15  # even inputs in the high nibble
        g = rows * s_stride + cols // group
        s = tl.load(scales + g, mask=inside, other=0).to(tl.float32)
        z = tl.load(zeros + g, mask=inside, other=0).to(tl.float32)
        w = (q.to(tl.float32) - z) * s
        tl.store(out + rows * n_cols + cols, w.to(out.dtype.element_ty), mask=inside)

    return dequant


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dequantize_int4(w: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The full-size weight [out, in] in dtype, on w's device; the Triton kernel on CUDA when it is there."""
    kernel = _kernel() if w.packed.device.type == "cuda" else None
    if kernel is None:
        return w.dequantize(dtype)
    packed, scales, zeros = w.packed.contiguous(), w.scales.contiguous(), w.zeros.contiguous()
    n, k = w.out_features, w.in_features
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    grid = (_cdiv(n, DEQUANT_ROWS), _cdiv(k, DEQUANT_COLS))
    kernel[grid](packed, scales, zeros, out, n, k, w.group_size, packed.stride(0), scales.stride(0),
                 ROWS=DEQUANT_ROWS, COLS=DEQUANT_COLS)
    return out
