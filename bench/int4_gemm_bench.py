"""The Triton int4 matmul (token trees, prefill) beside cuBLAS on the same weight in fp16, Llama-2-7B shapes.

    python bench/int4_gemm_bench.py [--tokens 16,64,256,1024]

Per matrix and token count: GPU time of one call (CUDA events, median of --repeats after a warm-up, a fresh
weight each shape), the host's time to queue it, and cuBLAS on the dense fp16 weight of the same shape
(which reads 4x the bytes); the ratio says what dequantizing inside the matmul costs.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from offload.kernels.int4_format import quantize_int4
from offload.kernels.int4_gemm_triton import int4_gemm

SHAPES = {"wqkv": (12288, 4096), "wo": (4096, 4096), "w13": (22016, 4096), "w2": (4096, 11008)}


def gpu_ms(fn, repeats: int) -> tuple[float, float]:
    """(median GPU ms, median host ms to queue) of fn()."""
    fn()
    torch.cuda.synchronize()
    gpu, host = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin = time.perf_counter()
        start.record()
        fn()
        end.record()
        host.append(1e3 * (time.perf_counter() - begin))
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end))
    return statistics.median(gpu), statistics.median(host)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="16,64,256,1024")
    p.add_argument("--repeats", type=int, default=20)
    ns = p.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    print("| matrix | tokens | int4 Triton ms | host ms | cuBLAS fp16 ms | int4 / fp16 |")
    print("|---|---|---|---|---|---|")
    for name, (out, inp) in SHAPES.items():
        gen = torch.Generator().manual_seed(out + inp)
        dense = torch.randn(out, inp, generator=gen)
        w = quantize_int4(dense, 128, scale_dtype=torch.float16).to("cuda")
        dense = dense.to("cuda", torch.float16)
        for tokens in map(int, ns.tokens.split(",")):
            x = torch.randn(tokens, inp, generator=gen).to("cuda", torch.float16)
            t4, host = gpu_ms(lambda: int4_gemm(x, w), ns.repeats)
            t16, _ = gpu_ms(lambda: F.linear(x, dense), ns.repeats)
            print(f"| {name} {out}x{inp} | {tokens} | {t4:.3f} | {host:.3f} | {t16:.3f} | {t4 / t16:.2f} |", flush=True)


if __name__ == "__main__":
    main()
