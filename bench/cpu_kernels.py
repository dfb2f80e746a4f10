"""CPU GEMV speed: bf16 F.linear against our bf16, int8 and int4 kernels, as ratios and GB/s of weights read.

    python bench/cpu_kernels.py [--threads N] [--runs 50] [--tokens 1 4] [--shapes llama2-7b|smollm2-135m]

Like decode, where each layer's weights are read once per token, every call reads a weight matrix that is
not in the caches: each kernel cycles through enough copies of its weights (ROTATION_BYTES, several times
the L3) and gets a fresh activation each call. Medians over --runs calls after warm-up, the kernels taking
turns so that load from other processes falls on all of them alike.
Targets (issue 4): int8 <= 0.6x and int4 <= 0.4x the bf16 time.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from offload.kernels import (
    Int4Weight,
    Int8Weight,
    cpu_extension,
    int4_matmul,
    int8_matmul,
    quantize_int4,
    quantize_int8,
)
from offload.kernels.decode_block import cpu_linear
from offload.kernels.tinygemm import tinygemm_scales_and_zeros

SHAPES = {  # (out, in) of each model's matrices
    "llama2-7b": ((4096, 4096), (11008, 4096), (4096, 11008)),  # wq/wo, w1/w3, w2
    "smollm2-135m": ((576, 576), (1536, 576), (576, 1536), (49152, 576)),  # wq/wo, w1/w3, w2, the tied head
}
ROTATION_BYTES = 256 * 2**20

Kernel = Callable[[torch.Tensor, int], torch.Tensor]  # (activation, which weight copy) -> output


def copies(nbytes: int) -> int:
    return max(2, math.ceil(ROTATION_BYTES / nbytes))


def kernels(w: torch.Tensor, tokens: int) -> list[tuple[str, Kernel, int]]:
    """(name, kernel, bytes of weights one call reads) for bf16, ours, and torch's own CPU int4 op; for
    several tokens also the alternative for prefill, dequantizing (pure torch) then bf16 F.linear."""
    w8, w4 = quantize_int8(w), quantize_int4(w, 128)
    g = w4.group_size  # 128, or 64 for 576-wide inputs
    b16 = [w.clone() for _ in range(copies(w.numel() * 2))]
    i8 = [Int8Weight.from_tensors({n: t.clone() for n, t in w8.tensors().items()}) for _ in range(copies(w8.nbytes()))]
    i4 = [Int4Weight.from_tensors({n: t.clone() for n, t in w4.tensors().items()}) for _ in range(copies(w4.nbytes()))]
    tg_sz = tinygemm_scales_and_zeros(w4)
    tg_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w4.unpack().int(), 2)
    tg_bytes = tg_packed.numel() * tg_packed.element_size() + tg_sz.numel() * tg_sz.element_size()
    tg = [(tg_packed.clone(), tg_sz.clone()) for _ in range(copies(tg_bytes))]
    dequantized: list[tuple[str, Kernel, int]] = [
        ("int8 dequantize + bf16 F.linear", lambda x, i: F.linear(x, i8[i % len(i8)].dequantize(x.dtype)),
         w8.nbytes()),
        ("int4 dequantize + bf16 F.linear", lambda x, i: F.linear(x, i4[i % len(i4)].dequantize(x.dtype)),
         w4.nbytes()),
    ]
    return [
        ("bf16 F.linear", lambda x, i: F.linear(x, b16[i % len(b16)]), w.numel() * 2),
        ("bf16 (ours, the decode step's GEMV)", lambda x, i: cpu_linear(x, [b16[i % len(b16)]]), w.numel() * 2),
        ("int8 (ours)", lambda x, i: int8_matmul(x, i8[i % len(i8)]), w8.nbytes()),
        (f"int4 g{g} (ours)", lambda x, i: int4_matmul(x, i4[i % len(i4)]), w4.nbytes()),
        (f"int4 g{g} (torch's CPU tinygemm op)",
         lambda x, i: torch.ops.aten._weight_int4pack_mm_for_cpu(x, tg[i % len(tg)][0], g, tg[i % len(tg)][1]),
         tg_bytes),
    ] + (dequantized if tokens > 1 else [])


def median_ms(fns: list[Kernel], inputs: list[torch.Tensor], runs: int) -> list[float]:
    """Median time per call of each kernel; kernels take turns within every run."""
    for fn in fns:
        for i in range(4):
            fn(inputs[i % len(inputs)], i)
    times: list[list[float]] = [[] for _ in fns]
    for i in range(runs):
        x = inputs[i % len(inputs)]
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn(x, i)
            ts.append(time.perf_counter() - start)
    return [1e3 * statistics.median(ts) for ts in times]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--tokens", type=int, nargs="+", default=[1])
    p.add_argument("--shapes", default="llama2-7b", choices=sorted(SHAPES))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ext = cpu_extension()
    if ext is None:
        raise SystemExit("the CPU kernels did not build; nothing to measure")
    print(f"torch {torch.__version__}, {args.threads} threads, SIMD width {ext.vector_width()} floats, "
          f"{args.runs} calls per row, weights cycled through {ROTATION_BYTES >> 20} MB so each call reads RAM")
    print("| out x in | tokens | kernel | median ms | x bf16 | GB/s of weights |")
    print("|---|---|---|---|---|---|")
    for out_f, in_f in SHAPES[args.shapes]:
        w = torch.randn(out_f, in_f, dtype=torch.bfloat16)
        for tokens in args.tokens:
            ks = kernels(w, tokens)
            inputs = [torch.randn(tokens, in_f, dtype=torch.bfloat16) for _ in range(8)]
            medians = median_ms([k for _, k, _ in ks], inputs, args.runs)
            for (name, _, nbytes), ms in zip(ks, medians):
                print(f"| {out_f}x{in_f} | {tokens} | {name} | {ms:.3f} | {ms / medians[0]:.2f} | "
                      f"{nbytes / ms / 1e6:.1f} |", flush=True)


if __name__ == "__main__":
    main()
