"""x @ int4 weight on the GPU in one Triton launch, dequantizing inside the matmul: for token trees and prefill.

Before, a streamed int4 pass of more than 16 tokens dequantized each matrix 2048 rows at a time (one Triton
pass and one cuBLAS call per chunk, ~21 chunks a Llama-2-7B block). Under the lent H200's sandbox the host
then needed 134 ms to queue a 32-block pass that the link moves in 64 ms: the pass was the host's, 1.8x a
one-token pass. One launch per matrix, and no full-size transient weight on the GPU.

The packed bytes hold input 2j in the high nibble and 2j + 1 in the low one, so the kernel never interleaves:
it multiplies the even inputs of x by the high nibbles and the odd inputs by the low ones. A step along K
stays inside one group, so a step loads one scale and zero per output column (the first version gathered
them per weight and ran 20x slower than cuBLAS on the fp16 weight). Dequantized as the twin does
((q - zero) * scale in float32, rounded once to x's dtype), accumulated in float32 (tl.dot); the sum's order
differs from cuBLAS's, so results agree to accumulation rounding, not bit for bit.
"""
from __future__ import annotations

import functools

import torch

from offload.kernels.int4_format import Int4Weight

BLOCK_N = 64  # a program's output columns
MAX_STEP_BYTES = 64  # packed bytes (2x inputs) a program takes per step along K: at most half a group


@functools.cache
def _kernel():
    """The compiled Triton kernel, or None where Triton cannot be imported."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def int4_gemm(x, packed, scales, zeros, y, m, n, k_bytes, group, x_stride, p_stride, s_stride, y_stride,
                  BM: tl.constexpr, BN: tl.constexpr, BB: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)  # (BM,) tokens
        cols = tl.program_id(1) * BN + tl.arange(0, BN)  # (BN,) outputs
        in_m, in_n = rows < m, cols < n
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for start in range(0, k_bytes, BB):  # BB divides half a group: one scale and zero per column a step
            byte_idx = start + tl.arange(0, BB)  # (BB,) packed bytes: inputs 2b and 2b + 1
            b = tl.load(packed + cols[None, :] * p_stride + byte_idx[:, None], mask=in_n[None, :], other=0)
            b = b.to(tl.int32)  # (BB, BN)
            g = cols * s_stride + (2 * start) // group  # (BN,)
            s = tl.load(scales + g, mask=in_n, other=0).to(tl.float32)[None, :]
            z = tl.load(zeros + g, mask=in_n, other=0).to(tl.float32)[None, :]
            x_at = x + rows[:, None] * x_stride + 2 * byte_idx[None, :]  # (BM, BB)
            x_even = tl.load(x_at, mask=in_m[:, None], other=0)
            x_odd = tl.load(x_at + 1, mask=in_m[:, None], other=0)
            w_even = ((((b >> 4) & 15).to(tl.float32) - z) * s).to(x_even.dtype)  # inputs 2b
            w_odd = ((((b & 15).to(tl.float32) - z) * s)).to(x_even.dtype)  # inputs 2b + 1
            acc += tl.dot(x_even, w_even)
            acc += tl.dot(x_odd, w_odd)
        out = y + rows[:, None] * y_stride + cols[None, :]
        tl.store(out, acc.to(y.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])

    return int4_gemm


def _block_m(tokens: int) -> int:
    """Tokens per program: a power of two from 16 (tl.dot's least) to 64."""
    return min(64, max(16, 1 << (tokens - 1).bit_length()))


def int4_gemm_supported(x: torch.Tensor, w: Int4Weight) -> bool:
    """Whether the kernel takes this pair: CUDA tensors, Triton present, fp16/bf16 activations, groups of a
    multiple of 32 inputs (a step along K is 16 or more bytes, tl.dot's least, within one group)."""
    return (x.device.type == "cuda" and w.packed.device.type == "cuda" and x.dtype in (torch.float16, torch.bfloat16)
            and w.group_size % 32 == 0 and _kernel() is not None)


def int4_gemm(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """x [tokens, in] @ dequantized(w).T -> [tokens, out] in x's dtype (int4_gemm_supported must hold)."""
    x, packed, scales, zeros = x.contiguous(), w.packed.contiguous(), w.scales.contiguous(), w.zeros.contiguous()
    m, n = x.shape[0], w.out_features
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bm = _block_m(m)
    grid = (-(-m // bm), -(-n // BLOCK_N))
    _kernel()[grid](x, packed, scales, zeros, y, m, n, packed.shape[1], w.group_size, x.stride(0),
                    packed.stride(0), scales.stride(0), y.stride(0), BM=bm, BN=BLOCK_N,
                    BB=min(MAX_STEP_BYTES, w.group_size // 2),
                    num_warps=4, num_stages=3)
    return y
