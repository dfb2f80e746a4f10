"""int4 dequantized on the GPU in one pass: a Triton kernel reads the packed bytes, scales and zeros once and
writes the weight in the compute dtype.

The torch twin (Int4Weight.dequantize) runs ~7 full-size passes through float32 temporaries; on an H200 that
made a streamed int4 pass of more than TINYGEMM_MAX_TOKENS tokens (a speculative tree, a batch) cost 2.2x a
one-token pass. Same arithmetic as the twin: (q - zero) * scale in float32, then one rounding to the dtype,
so the two agree bit for bit. Without Triton (or off CUDA) the twin runs.
"""
from __future__ import annotations

import functools

import torch

from offload.kernels.int4_format import Int4Weight

BLOCK_ROWS, BLOCK_COLS = 16, 256  # one program's tile of the output [out, in]


@functools.cache
def _kernel():
    """The compiled Triton kernel, or None where Triton cannot be imported."""
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


def dequantize_int4(w: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The full-size weight [out, in] in dtype, on w's device; the Triton kernel on CUDA when it is there."""
    kernel = _kernel() if w.packed.device.type == "cuda" else None
    if kernel is None:
        return w.dequantize(dtype)
    packed, scales, zeros = w.packed.contiguous(), w.scales.contiguous(), w.zeros.contiguous()
    n, k = w.out_features, w.in_features
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    grid = (_cdiv(n, BLOCK_ROWS), _cdiv(k, BLOCK_COLS))
    kernel[grid](packed, scales, zeros, out, n, k, w.group_size, packed.stride(0), scales.stride(0),
                 ROWS=BLOCK_ROWS, COLS=BLOCK_COLS)
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
