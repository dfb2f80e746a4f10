"""One token times an int4 weight on the GPU in Triton: the one-row matmul of a decode step, built to read the
weight at HBM speed.

Resident int4 decode of the Llama-2-7B shape on the H200 spent 2.03 ms of its 3.03 ms step in tinygemm's
one-row matmul (`torch.ops.aten._weight_int4pack_mm`), which reads the weight at ~40% of the HBM bandwidth.
A one-row matmul does two flops per weight read, so only the bytes count: this kernel streams the Int4Weight
as it is stored (no tinygemm layout), each program owning `block_n` output rows and walking K in steps of
`block_k_words` int32 words (8 inputs each) per row.

- Words: packed.view(int32) is [out, in/8]; little endian, byte b of word i holds input 8i + 2b in bits
  8b+4..8b+7 and 8i + 2b + 1 in bits 8b..8b+3.
- No int-to-float conversion (quarter rate on the SM): a nibble masked in place, `bits = w & (15 << s)` for
  s <= 16, ORed into the float 2**23 and less 2**23 is exactly q * 2**s; x is scaled by 2**-s instead (x is
  shared by all rows, so that costs per input, not per weight). The three nibbles above bit 19 come from
  w >> 12. A nibble costs one logic op, one add and one fma.
- The zero point folds per group: sum_k x_k s (q_k - z) = s (sum_k x_k q_k - z sum_k x_k).
- A step's block_k_words words a row are units of equal width (powers of two), each inside one group: whole
  groups, or parts of a group wider than the step. One scale and zero per row and unit; units past the last
  (a step beyond K's end) reread the last with scale 0.
- split_k > 1 splits K over programs (0: enough splits for AUTO_SPLIT_WARPS warps in all); float32 partials
  are then summed by a second small kernel, or added atomically into a zeroed float32 row (`atomic`) and cast.
Accumulates in float32; the result is in x's dtype.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from offload.kernels.int4_format import Int4Weight

AUTO_SPLIT_WARPS = 2048  # split_k=0: the least split giving this many warps in the grid (~16 a SM on 132 SMs)
PARTIAL_SUM_BLOCK = 1024  # outputs a program of the second pass sums


class GemvConfig(NamedTuple):
    block_n: int  # output rows a program owns (a power of two)
    block_k_words: int  # int32 words (8 inputs) a row loads per step (a power of two)
    split_k: int  # programs along K; 0: chosen from AUTO_SPLIT_WARPS
    num_warps: int
    num_stages: int  # Triton's software pipelining of the step's loads
    atomic: bool = False  # with split_k > 1: atomic adds into a zeroed float32 row, else a second pass

    @property
    def name(self) -> str:
        return (f"n{self.block_n}_k{self.block_k_words}_s{self.split_k or 'auto'}_w{self.num_warps}"
                f"_st{self.num_stages}" + ("_atomic" if self.atomic else ""))


# What bench/int4_gemv_sweep.py measures: wide steps and no split, narrow steps split over K, both reductions.
CANDIDATE_CONFIGS = {c.name: c for c in (
    GemvConfig(16, 64, 1, 4, 3),
    GemvConfig(16, 128, 1, 4, 2),
    GemvConfig(32, 64, 1, 4, 3),
    GemvConfig(8, 128, 1, 4, 3),
    GemvConfig(32, 32, 1, 2, 1),
    GemvConfig(16, 64, 2, 4, 3),
    GemvConfig(64, 16, 0, 2, 3),
    GemvConfig(64, 16, 0, 2, 3, atomic=True),
    GemvConfig(32, 32, 0, 2, 3),
    GemvConfig(64, 32, 0, 4, 4),
    GemvConfig(128, 16, 0, 4, 2),
    GemvConfig(32, 64, 0, 4, 3),
)}
DEFAULT_CONFIG = GemvConfig(16, 64, 1, 4, 3)  # provisional: not yet measured (the sweep picks the real one)


@functools.cache
def _kernels():
    """(gemv kernel, partial-sum kernel) compiled by Triton, or None where Triton cannot be imported."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit(do_not_specialize=["n", "units", "units_per_group", "steps", "steps_per_split"])
    def int4_gemv(x, words, scales, zeros, out, n, units, units_per_group, steps, steps_per_split,
                  w_stride, s_stride, BN: tl.constexpr, UNITS: tl.constexpr, WPU: tl.constexpr,
                  ATOMIC: tl.constexpr):
        rows = tl.program_id(0) * BN + tl.arange(0, BN)  # (BN,)
        rows_read = tl.minimum(rows, n - 1)  # the last block's extra rows reread row n - 1, never stored
        unit_in_step = tl.arange(0, UNITS)  # (UNITS,)
        word_in_unit = tl.arange(0, WPU)  # (WPU,)
        w_rows = words + rows_read[:, None, None] * w_stride  # (BN, 1, 1)
        s_rows = rows_read[:, None] * s_stride  # (BN, 1)
        acc = tl.zeros((BN, UNITS, WPU), dtype=tl.float32)
        first = tl.program_id(1) * steps_per_split
        for step in range(first, tl.minimum(first + steps_per_split, steps)):
            unit = step * UNITS + unit_in_step  # (UNITS,)
            present = unit < units
            unit = tl.minimum(unit, units - 1)
            word = unit[:, None] * WPU + word_in_unit[None, :]  # (UNITS, WPU) word index along K
            w = tl.load(w_rows + word[None, :, :])  # (BN, UNITS, WPU) int32
            group = s_rows + (unit // units_per_group)[None, :]  # (BN, UNITS)
            s = tl.where(present[None, :], tl.load(scales + group).to(tl.float32), 0.0)[:, :, None]
            z = tl.load(zeros + group).to(tl.float32)[:, :, None]  # (BN, UNITS, 1)
            x_at = x + 8 * word  # (UNITS, WPU) each word's first input
            x0 = tl.load(x_at).to(tl.float32)
            x1 = tl.load(x_at + 1).to(tl.float32)
            x2 = tl.load(x_at + 2).to(tl.float32)
            x3 = tl.load(x_at + 3).to(tl.float32)
            x4 = tl.load(x_at + 4).to(tl.float32)
            x5 = tl.load(x_at + 5).to(tl.float32)
            x6 = tl.load(x_at + 6).to(tl.float32)
            x7 = tl.load(x_at + 7).to(tl.float32)
            t = -z * (x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7)[None, :, :]  # (BN, UNITS, WPU)
            high = w >> 12  # inputs 8i+4, 8i+7, 8i+6 now at bits 8, 12, 16
            # A nibble q at bits s..s+3 ORed into the float 2**23, less 2**23, is q * 2**s exactly: x takes the 2**-s.
            q = ((w & 0xF0) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # input 8i at bits 4..7
            t = tl.fma(q, x0[None, :, :] * 0.0625, t)
            q = ((w & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # input 8i+1 at bits 0..3
            t = tl.fma(q, x1[None, :, :], t)
            q = ((w & 0xF000) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # input 8i+2 at 12..15
            t = tl.fma(q, x2[None, :, :] * 0.000244140625, t)
            q = ((w & 0xF00) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # input 8i+3 at 8..11
            t = tl.fma(q, x3[None, :, :] * 0.00390625, t)
            q = ((high & 0xF00) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # input 8i+4 at 20..23
            t = tl.fma(q, x4[None, :, :] * 0.00390625, t)
            q = ((w & 0xF0000) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # input 8i+5 at 16..19
            t = tl.fma(q, x5[None, :, :] * 0.0000152587890625, t)
            q = ((high & 0xF0000) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # input 8i+6 at 28..31
            t = tl.fma(q, x6[None, :, :] * 0.0000152587890625, t)
            q = ((high & 0xF000) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # input 8i+7 at 24..27
            t = tl.fma(q, x7[None, :, :] * 0.000244140625, t)
            acc = tl.fma(s, t, acc)
        dot = tl.sum(tl.sum(acc, axis=2), axis=1)  # (BN,)
        if ATOMIC:
            tl.atomic_add(out + rows, dot, mask=rows < n)
        else:  # one row of float32 partials a split, or y itself without a split
            tl.store(out + tl.program_id(1) * n + rows, dot.to(out.dtype.element_ty), mask=rows < n)

    @triton.jit(do_not_specialize=["n", "split"])
    def sum_partials(partials, y, n, split, BLOCK: tl.constexpr):
        cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in range(split):
            acc += tl.load(partials + i * n + cols, mask=cols < n, other=0.0)
        tl.store(y + cols, acc.to(y.dtype.element_ty), mask=cols < n)

    return int4_gemv, sum_partials


def int4_gemv_supported(x: torch.Tensor, w: Int4Weight) -> bool:
    """Whether the kernel takes this pair: one token of fp16/bf16 on CUDA, w on CUDA, groups of a multiple of 8
    inputs (whole words), Triton present."""
    return (x.device.type == "cuda" and w.packed.device.type == "cuda" and x.dtype in (torch.float16, torch.bfloat16)
            and x.numel() == w.in_features and x.shape[-1] == w.in_features and w.group_size % 8 == 0
            and _kernels() is not None)


def _words(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] as int32 [out, in/8] (a copy only when the bytes are not a contiguous, aligned run)."""
    packed = packed.contiguous()
    if packed.storage_offset() % 4:
        packed = packed.clone()
    return packed.view(torch.int32)


def _step_shape(in_features: int, group_size: int, block_k_words: int) -> tuple[int, int]:
    """(units a step, words a unit): a unit lies inside one group, both powers of two."""
    group_words = group_size // 8
    words_per_unit = min(block_k_words, group_words & -group_words)  # the largest power of two dividing it
    units = in_features // 8 // words_per_unit
    return min(block_k_words // words_per_unit, _next_power_of_2(units)), words_per_unit


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def int4_gemv(x: torch.Tensor, w: Int4Weight, **config) -> torch.Tensor:
    """x [1, in] or [in] @ dequantized(w).T -> [1, out] or [out] in x's dtype; config: GemvConfig's fields
    (defaults DEFAULT_CONFIG). int4_gemv_supported must hold (or run under TRITON_INTERPRET on CPU tensors)."""
    c = DEFAULT_CONFIG._replace(**config)
    gemv, sum_partials = _kernels()
    n, k = w.out_features, w.in_features
    xv = x.reshape(k).contiguous()
    words, scales, zeros = _words(w.packed), w.scales.contiguous(), w.zeros.contiguous()
    units_per_step, words_per_unit = _step_shape(k, w.group_size, c.block_k_words)
    units = k // 8 // words_per_unit
    steps = -(-units // units_per_step)
    row_blocks = -(-n // c.block_n)
    split = c.split_k or -(-AUTO_SPLIT_WARPS // (row_blocks * c.num_warps))
    steps_per_split = -(-steps // min(split, steps))
    split = -(-steps // steps_per_split)  # no split left without steps
    if split == 1:
        out = y = torch.empty(n, dtype=x.dtype, device=x.device)
    elif c.atomic:
        out = torch.zeros(n, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(split, n, dtype=torch.float32, device=x.device)  # (split, out) partials
    gemv[(row_blocks, split)](xv, words, scales, zeros, out, n, units, w.group_size // 8 // words_per_unit, steps,
                              steps_per_split, words.stride(0), scales.stride(0), BN=c.block_n, UNITS=units_per_step,
                              WPU=words_per_unit, ATOMIC=split > 1 and c.atomic, num_warps=c.num_warps,
                              num_stages=c.num_stages)
    if split > 1 and c.atomic:
        y = out.to(x.dtype)
    elif split > 1:
        y = torch.empty(n, dtype=x.dtype, device=x.device)
        sum_partials[(-(-n // PARTIAL_SUM_BLOCK),)](out, y, n, split, BLOCK=PARTIAL_SUM_BLOCK)
    return y.view(*x.shape[:-1], n)
