"""An experiment: a Triton one-row int4 matmul on our plain Int4Weight layout beside tinygemm, 7B shapes.

    python bench/int4_gemv_bench.py

tinygemm's one-row call is ~72% of a graphed int4 decode step and reads its weights at ~1.2 TB/s of the
H200's ~4.3; a resident int4 step at 40% of the HBM limit needs the matmuls near 2.5 TB/s. Here each program
owns BLOCK_N output rows and walks the inputs a few groups at a time: per group it sums q * x over the group
and subtracts zero * sum(x), so scales and zeros are read once per group, not per weight. Timed as replays of
a CUDA graph over several weight copies (more bytes than the 50 MB L2), median of 20; bytes counted are the
packed weights plus scales and zeros.
"""
from __future__ import annotations

import functools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from offload.kernels.int4_format import Int4Weight  # noqa: E402
from offload.kernels.tinygemm import int4_matmul_tinygemm, prepare_for_cuda  # noqa: E402

SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)]  # wqkv, wo, w13, w2 of Llama-2-7B
GROUP = 128
CONFIGS = [(8, 2, 4), (16, 2, 4), (16, 2, 8), (32, 2, 8), (8, 1, 2), (4, 2, 2)]  # BLOCK_N, GROUPS, num_warps


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gemv(x, packed, scales, zeros, out, n_out, p_stride, s_stride, N_GROUPS: tl.constexpr,
             GROUP: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = rows < n_out
        half = tl.arange(0, GROUP // 2)
        gi = tl.arange(0, GROUPS)
        acc = tl.zeros((BLOCK_N,), tl.float32)
        for g0 in range(0, N_GROUPS, GROUPS):
            g = g0 + gi  # (GROUPS,)
            byte_at = rows[:, None, None] * p_stride + g[None, :, None] * (GROUP // 2) + half[None, None, :]
            b = tl.load(packed + byte_at, mask=live[:, None, None], other=0).to(tl.int32)  # (BLOCK_N, GROUPS, half)
            xe = tl.load(x + g[:, None] * GROUP + 2 * half[None, :]).to(tl.float32)  # (GROUPS, half): even inputs
            xo = tl.load(x + g[:, None] * GROUP + 2 * half[None, :] + 1).to(tl.float32)
            dot = tl.sum((b >> 4).to(tl.float32) * xe[None] + (b & 15).to(tl.float32) * xo[None], axis=2)
            xsum = tl.sum(xe + xo, axis=1)  # (GROUPS,)
            sz_at = rows[:, None] * s_stride + g[None, :]
            s = tl.load(scales + sz_at, mask=live[:, None], other=0).to(tl.float32)
            z = tl.load(zeros + sz_at, mask=live[:, None], other=0).to(tl.float32)
            acc += tl.sum(s * (dot - z * xsum[None, :]), axis=1)
        tl.store(out + rows, acc.to(out.dtype.element_ty), mask=live)

    return gemv


def triton_gemv(x: torch.Tensor, w: Int4Weight, block_n: int, groups: int, warps: int) -> torch.Tensor:
    """x (in,) @ w.T -> (out,) in x's dtype."""
    n, n_groups = w.out_features, w.scales.shape[1]
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    _kernel()[(-(-n // block_n),)](x, w.packed, w.scales, w.zeros, out, n, w.packed.stride(0), w.scales.stride(0),
                                   N_GROUPS=n_groups, GROUP=w.group_size, BLOCK_N=block_n, GROUPS=groups,
                                   num_warps=warps)
    return out


def random_int4(n: int, k: int, seed: int) -> Int4Weight:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    packed = torch.randint(0, 256, (n, k // 2), generator=gen, device="cuda", dtype=torch.uint8)
    scales = (torch.rand(n, k // GROUP, generator=gen, device="cuda") * 0.02 + 0.001).to(torch.bfloat16)
    zeros = torch.randint(0, 16, (n, k // GROUP), generator=gen, device="cuda").to(torch.bfloat16)
    return Int4Weight(packed, scales, zeros)


def graph_us(fn, copies: int) -> float:
    """Median per-call time of `fn(i)` over copies i, replayed from a CUDA graph of copies * 4 calls."""
    for i in range(copies):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for r in range(4 * copies):
            fn(r % copies)
    times = []
    for _ in range(20):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) * 1e3 / (4 * copies))
    return statistics.median(times)


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__)
    rows = ["| shape (out x in) | tinygemm us | GB/s | best Triton us | GB/s | config (BLOCK_N, GROUPS, warps) | "
            "rel. error vs dequantized |", "|---|---|---|---|---|---|---|"]
    for n, k in SHAPES:
        copies = max(2, int(200e6 // (n * k // 2)))
        weights = [random_int4(n, k, seed=i) for i in range(copies)]
        tiny = [prepare_for_cuda(w) for w in weights]
        x = torch.randn(k, device="cuda").to(torch.bfloat16)
        nbytes = n * k // 2 + 2 * 2 * n * (k // GROUP)
        ref = (weights[0].dequantize(torch.float32) @ x.float())
        t_tiny = graph_us(lambda i: int4_matmul_tinygemm(x[None], tiny[i]), copies)
        best = None
        for block_n, groups, warps in CONFIGS:
            if (k // GROUP) % groups:
                continue
            y = triton_gemv(x, weights[0], block_n, groups, warps).float()
            err = float((y - ref).norm() / ref.norm())
            t = graph_us(lambda i: triton_gemv(x, weights[i], block_n, groups, warps), copies)
            print(f"{n}x{k} {block_n},{groups},{warps}: {t:.1f} us {nbytes / t / 1e3:.0f} GB/s err {err:.1e}")
            if best is None or t < best[0]:
                best = (t, (block_n, groups, warps), err)
        tiny_err = float((int4_matmul_tinygemm(x[None], tiny[0])[0].float() - ref).norm() / ref.norm())
        rows.append(f"| {n} x {k} | {t_tiny:.1f} | {nbytes / t_tiny / 1e3:.0f} | {best[0]:.1f} | "
                    f"{nbytes / best[0] / 1e3:.0f} | {best[1]} | {best[2]:.1e} (tinygemm {tiny_err:.1e}) |")
        del weights, tiny
    print("\n".join(rows))


if __name__ == "__main__":
    main()
