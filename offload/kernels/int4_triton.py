"""int4 on the GPU in Triton, on our plain layout (what streams): a one-pass dequantize for prefill-sized
inputs, and a small-batch matmul that reads the packed weight once for decode-sized ones.

Dequantize: the torch twin (Int4Weight.dequantize) runs ~7 full-size passes through float32 temporaries; on
an H200 that made a streamed int4 pass of more than 16 tokens cost 2.2x a one-token pass. Same arithmetic as
the twin ((q - zero) * scale in float32, one rounding to the dtype), so the two agree bit for bit.

Small-batch matmul (up to SMALL_BATCH rows of x, fp16/bf16): each program dequantizes a [BLOCK_N outputs x
2*BLOCK_BYTES inputs] tile in registers and multiplies it on the tensor cores; the inputs are split across
programs (split-K) so that a 4096-row weight still fills the GPU, and the partial sums are added in a fixed
order (deterministic). Even inputs sit in the high nibble: x's even and odd columns meet the high and low
nibbles of the same bytes, and both belong to one group (group sizes are even).

Without Triton (or off CUDA) callers use the torch paths in matmul.py.
"""
from __future__ import annotations

import functools

import torch

from offload.kernels.int4_format import Int4Weight

DEQUANT_ROWS, DEQUANT_COLS = 16, 256  # one dequantize program's tile of the output [out, in]
SMALL_BATCH = 16  # rows of x the matmul takes (one tensor-core tile; fewer are masked)
BLOCK_N, BLOCK_BYTES = 64, 64  # one matmul program's tile: outputs x packed bytes (2 inputs each) per step
TARGET_PROGRAMS = 512  # split-K until about this many programs run (an H200 has 132 SMs)


@functools.cache
def _kernels():
    """(dequantize, small-batch matmul) compiled Triton kernels, or None where Triton cannot be imported."""
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

    @triton.jit
    def matmul(x, packed, scales, zeros, partial, m, n, n_bytes, group, x_stride, p_stride, s_stride,
               bytes_per_split, BM: tl.constexpr, BN: tl.constexpr, BB: tl.constexpr):
        outs = tl.program_id(0) * BN + tl.arange(0, BN)  # (BN,) output features
        split = tl.program_id(1)
        rows = tl.arange(0, BM)  # (BM,) rows of x
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        begin = split * bytes_per_split
        end = tl.minimum(begin + bytes_per_split, n_bytes)
        for b0 in range(begin, end, BB):
            b = b0 + tl.arange(0, BB)  # (BB,) packed byte columns: inputs 2b and 2b + 1
            w_in = (outs[:, None] < n) & (b[None, :] < end)  # (BN, BB)
            byte = tl.load(packed + outs[:, None] * p_stride + b[None, :], mask=w_in, other=0).to(tl.int32)
            g = outs[:, None] * s_stride + (2 * b[None, :]) // group
            s = tl.load(scales + g, mask=w_in, other=0).to(tl.float32)
            z = tl.load(zeros + g, mask=w_in, other=0).to(tl.float32)
            x_in = (rows[:, None] < m) & (b[None, :] < end)  # (BM, BB)
            x_even = tl.load(x + rows[:, None] * x_stride + 2 * b[None, :], mask=x_in, other=0)
            x_odd = tl.load(x + rows[:, None] * x_stride + 2 * b[None, :] + 1, mask=x_in, other=0)
            w_even = (((byte >> 4).to(tl.float32) - z) * s).to(x_even.dtype)  # (BN, BB)
            w_odd = (((byte & 15).to(tl.float32) - z) * s).to(x_even.dtype)
            acc += tl.dot(x_even, tl.trans(w_even))
            acc += tl.dot(x_odd, tl.trans(w_odd))
        done = (rows[:, None] < m) & (outs[None, :] < n)
        tl.store(partial + (split * m + rows[:, None]) * n + outs[None, :], acc, mask=done)

    return dequant, matmul


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dequantize_int4(w: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The full-size weight [out, in] in dtype, on w's device; the Triton kernel on CUDA when it is there."""
    kernels = _kernels() if w.packed.device.type == "cuda" else None
    if kernels is None:
        return w.dequantize(dtype)
    packed, scales, zeros = w.packed.contiguous(), w.scales.contiguous(), w.zeros.contiguous()
    n, k = w.out_features, w.in_features
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    grid = (_cdiv(n, DEQUANT_ROWS), _cdiv(k, DEQUANT_COLS))
    kernels[0][grid](packed, scales, zeros, out, n, k, w.group_size, packed.stride(0), scales.stride(0),
                     ROWS=DEQUANT_ROWS, COLS=DEQUANT_COLS)
    return out


def small_batch_supported(x: torch.Tensor, w: Int4Weight) -> bool:
    """Whether int4_small_batch takes x [tokens, in] @ w: CUDA, fp16/bf16, at most SMALL_BATCH tokens."""
    return (x.is_cuda and w.packed.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            and x.shape[0] <= SMALL_BATCH and _kernels() is not None)


def int4_small_batch(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """x [tokens <= SMALL_BATCH, in] @ dequantized(w).T -> [tokens, out] in x's dtype (see small_batch_supported)."""
    x = x.contiguous()
    packed, scales, zeros = w.packed.contiguous(), w.scales.contiguous(), w.zeros.contiguous()
    m, n, n_bytes = x.shape[0], w.out_features, packed.shape[1]
    blocks = _cdiv(n, BLOCK_N)
    steps = _cdiv(n_bytes, BLOCK_BYTES)
    splits = max(1, min(steps, TARGET_PROGRAMS // blocks))
    bytes_per_split = _cdiv(steps, splits) * BLOCK_BYTES
    splits = _cdiv(n_bytes, bytes_per_split)
    partial = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    _kernels()[1][(blocks, splits)](x, packed, scales, zeros, partial, m, n, n_bytes, w.group_size, x.stride(0),
                                    packed.stride(0), scales.stride(0), bytes_per_split,
                                    BM=SMALL_BATCH, BN=BLOCK_N, BB=BLOCK_BYTES)
    return partial.sum(0).to(x.dtype)
