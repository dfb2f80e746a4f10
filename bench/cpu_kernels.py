"""CPU GEMV speed: bf16 F.linear against our int8 and int4 kernels, as ratios and GB/s of weights read.

    python bench/cpu_kernels.py [--threads N] [--runs 50] [--tokens 1 4]

Each timed call gets a fresh activation, and a 128 MB scratch read between calls evicts the caches, so
weights come from RAM as they do in decode (a layer's weights are read once per token). Medians over
--runs calls after warm-up. Targets (issue 4): int8 <= 0.6x and int4 <= 0.4x the bf16 time.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from offload.kernels import cpu_extension, int4_matmul, int8_matmul, quantize_int4, quantize_int8
from offload.kernels.tinygemm import tinygemm_scales_and_zeros

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # (out, in): Llama-2-7B q/o, w1/w3, w2
FLUSH = torch.ones(32 * 1024 * 1024)  # 128 MB, four times this machine's L3


def median_ms(fn: Callable[[torch.Tensor], torch.Tensor], inputs: list[torch.Tensor], runs: int) -> float:
    for x in inputs[:3]:
        fn(x)
    times = []
    for i in range(runs):
        x = inputs[i % len(inputs)]
        FLUSH.sum()
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def bench_shape(out_f: int, in_f: int, tokens: int, runs: int) -> list[tuple[str, float, int]]:
    """(name, median ms, weight bytes) per variant."""
    w = torch.randn(out_f, in_f, dtype=torch.bfloat16)
    w8, w4 = quantize_int8(w), quantize_int4(w, 128)
    tg_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w4.unpack().int(), 2)
    tg_sz = tinygemm_scales_and_zeros(w4)
    inputs = [torch.randn(tokens, in_f, dtype=torch.bfloat16) for _ in range(8)]
    variants: list[tuple[str, Callable[[torch.Tensor], torch.Tensor], int]] = [
        ("bf16 F.linear", lambda x: F.linear(x, w), w.numel() * w.element_size()),
        ("int8 (ours)", lambda x: int8_matmul(x, w8), w8.nbytes()),
        ("int4 g128 (ours)", lambda x: int4_matmul(x, w4), w4.nbytes()),
        ("int4 g128 (torch tinygemm CPU op)",
         lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, tg_packed, 128, tg_sz),
         tg_packed.numel() * tg_packed.element_size() + tg_sz.numel() * tg_sz.element_size()),
    ]
    return [(name, median_ms(fn, inputs, runs), nbytes) for name, fn, nbytes in variants]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--tokens", type=int, nargs="+", default=[1])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ext = cpu_extension()
    if ext is None:
        raise SystemExit("the CPU kernels did not build; nothing to measure")
    print(f"torch {torch.__version__}, {args.threads} threads, SIMD width {ext.vector_width()} floats, "
          f"{args.runs} runs per row, caches flushed between runs")
    print(f"| out x in | tokens | kernel | median ms | x bf16 | GB/s of weights |")
    print(f"|---|---|---|---|---|---|")
    for tokens in args.tokens:
        for out_f, in_f in SHAPES:
            rows = bench_shape(out_f, in_f, tokens, args.runs)
            base = rows[0][1]
            for name, ms, nbytes in rows:
                print(f"| {out_f}x{in_f} | {tokens} | {name} | {ms:.3f} | {ms / base:.2f} | "
                      f"{nbytes / ms / 1e6:.1f} |", flush=True)


if __name__ == "__main__":
    main()
