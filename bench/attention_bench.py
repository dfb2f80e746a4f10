"""The decode step's split attention (llama/fused_ops.py) beside torch's SDPA, at the 7B shape, over settings.

    python bench/attention_bench.py

One query per head (32 heads of 128, fp16) over 32 layers' caches of kv_len positions, the step's additive
mask included, each setting in one launch (the last split combines) and in two, timed as replays of a CUDA
graph of the 32 calls (the caches, 4 MB a layer at 256, are read from HBM, not L2), median of 20. The floor is the KV bytes at the HBM copy bandwidth measured here.
"""
from __future__ import annotations

import itertools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.decode_bench import hbm_gbps  # noqa: E402
from llama import fused_ops  # noqa: E402

LAYERS, HEADS, HEAD_DIM = 32, 32, 128
SETTINGS = [(32, 1024, 2), (32, 1024, 4), (64, 1024, 4), (16, 1024, 1), (32, 2048, 2), (32, 512, 2),
            (64, 2048, 4), (16, 2048, 2)]  # (block, programs, warps)


def graph_us(fn) -> float:
    """Median time of one replay of a graph holding fn(layer) for every layer, per layer."""
    for layer in range(LAYERS):
        fn(layer)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in range(LAYERS):
            fn(layer)
    times = []
    for _ in range(20):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) * 1e3 / LAYERS)
    return statistics.median(times)


def main() -> None:
    hbm = hbm_gbps(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()}, HBM copy {hbm:.0f} GB/s")
    out = ["| kv_len | path (block, programs, warps) | us per layer | floor us | rel. error |", "|---|---|---|---|---|"]
    for kv_len in (256, 1024, 4096):
        caches = torch.randn(LAYERS, 2, 1, HEADS, 1024 + kv_len, HEAD_DIM, device="cuda").half()
        q = torch.randn(LAYERS, 1, 1, HEADS, HEAD_DIM, device="cuda").half()
        mask = torch.zeros(1, 1, kv_len, device="cuda", dtype=torch.half)
        mask[..., kv_len - 7 :] = float("-inf")  # the bucket's positions past the sequence
        kv = lambda i: (caches[i, 0, :, :, :kv_len], caches[i, 1, :, :, :kv_len])  # noqa: E731
        floor = 2 * HEADS * kv_len * HEAD_DIM * 2 / hbm / 1e3
        ref = fused_ops.attention_reference(q[0].float(), *(t.float() for t in kv(0)), mask.float())
        t = graph_us(lambda i: fused_ops.attention_reference(q[i], *kv(i), mask))
        out.append(f"| {kv_len} | torch SDPA | {t:.2f} | {floor:.2f} | - |")
        for (block, programs, warps), one_launch in itertools.product(SETTINGS, (True, False)):
            got = fused_ops.attention(q[0], *kv(0), mask, block=block, programs=programs, warps=warps,
                                      one_launch=one_launch)
            err = float((got.float() - ref).norm() / ref.norm())
            t = graph_us(lambda i: fused_ops.attention(q[i], *kv(i), mask, block=block, programs=programs,
                                                       warps=warps, one_launch=one_launch))
            how = "one launch" if one_launch else "split + combine"
            out.append(f"| {kv_len} | {how} ({block}, {programs}, {warps}) | {t:.2f} | {floor:.2f} | {err:.1e} |")
        del caches
    print("\n".join(out))


if __name__ == "__main__":
    main()
