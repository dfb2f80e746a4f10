"""The Triton one-token int4 matmul's candidate configs beside tinygemm and cuBLAS fp16, Llama-2-7B shapes.

    python bench/int4_gemv_sweep.py [--dtype bfloat16] [--configs NAME,...] [--json out.json]

Per matrix: --weights different random weights (more bytes than the L2 holds, so each call reads HBM), one
call each captured in a CUDA graph; the time per call is the median replay over --replays, divided by the
calls. Bandwidth counts the bytes a call must read (int4: packed + scales + zeros; fp16: the dense weight),
also as a share of the device-to-device copy bandwidth measured in the same run (bench/decode_bench.py's
limit). Each config's result on the first weight is checked against int4_matmul_reference (max |error| over
max |reference|). Then the best config per matrix, and a 7B step's matmuls (wqkv + wo + w13 + w2, 32 layers)
with the best single config against tinygemm.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.decode_bench import hbm_gbps  # noqa: E402
from offload.kernels.int4_format import Int4Weight  # noqa: E402
from offload.kernels.int4_gemv_triton import CANDIDATE_CONFIGS, int4_gemv  # noqa: E402
from offload.kernels.matmul import int4_matmul_reference  # noqa: E402
from offload.kernels.tinygemm import int4_matmul_tinygemm, prepare_for_cuda  # noqa: E402

SHAPES = {"wqkv": (12288, 4096), "wo": (4096, 4096), "w13": (22016, 4096), "w2": (4096, 11008)}
LAYERS = 32
GROUP = 128


def graph_us(calls: list[Callable[[], torch.Tensor]], replays: int) -> float:
    """GPU microseconds per call: the calls captured in one CUDA graph, median replay / number of calls."""
    for call in calls:  # compiles, and warms what capture must not allocate for the first time
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(replays):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    del graph
    return 1e3 * statistics.median(times) / len(calls)


def random_int4(out: int, inp: int, dtype: torch.dtype, gen: torch.Generator) -> Int4Weight:
    groups = inp // GROUP
    packed = torch.randint(0, 256, (out, inp // 2), generator=gen, device="cuda", dtype=torch.uint8)
    scales = (torch.rand(out, groups, generator=gen, device="cuda") * 0.01 + 0.001).to(dtype)
    zeros = torch.randint(0, 16, (out, groups), generator=gen, device="cuda").to(dtype)
    return Int4Weight(packed=packed, scales=scales, zeros=zeros)


def int4_bytes(w: Int4Weight) -> int:
    return sum(t.numel() * t.element_size() for t in (w.packed, w.scales, w.zeros))


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max())


def sweep_shape(out: int, inp: int, configs: dict, dtype: torch.dtype, n_weights: int, replays: int, hbm: float,
                gen: torch.Generator) -> dict[str, dict[str, float]]:
    """{kernel: {us, gbps, hbm_pct, error}} for one matrix shape."""
    weights = [random_int4(out, inp, dtype, gen) for _ in range(n_weights)]
    x = torch.randn(1, inp, generator=gen, device="cuda").to(dtype)
    ref = int4_matmul_reference(x.float(), weights[0])  # (1, out) float32, not rounded to x's dtype
    nbytes = int4_bytes(weights[0])
    rows = {}

    def record(name: str, us: float, read: int, y: torch.Tensor) -> None:
        gbps = read / us / 1e3
        rows[name] = dict(us=us, gbps=gbps, hbm_pct=100 * gbps / hbm, error=relative_error(y, ref))

    for name, c in configs.items():
        kw = c._asdict()
        us = graph_us([lambda w=w: int4_gemv(x, w, **kw) for w in weights], replays)
        record(name, us, nbytes, int4_gemv(x, weights[0], **kw))
    tiny = [prepare_for_cuda(w) for w in weights]
    xb = x.to(torch.bfloat16)
    us = graph_us([lambda w=w: int4_matmul_tinygemm(xb, w) for w in tiny], replays)
    record("tinygemm", us, nbytes, int4_matmul_tinygemm(xb, tiny[0]))
    del tiny, weights
    x16 = x.to(torch.float16)
    dense = [torch.randn(out, inp, generator=gen, device="cuda", dtype=torch.float16) for _ in range(n_weights)]
    us = graph_us([lambda d=d: F.linear(x16, d) for d in dense], replays)
    rows["fp16 F.linear"] = dict(us=us, gbps=out * inp * 2 / us / 1e3, hbm_pct=100 * out * inp * 2 / us / 1e3 / hbm,
                                 error=float("nan"))  # a different (dense) weight: no reference
    del dense
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--configs", default=",".join(CANDIDATE_CONFIGS), help="names from CANDIDATE_CONFIGS")
    p.add_argument("--weights", type=int, default=20, help="different weights a graph cycles through")
    p.add_argument("--replays", type=int, default=10)
    p.add_argument("--json", help="write every figure here")
    ns = p.parse_args()
    dtype = getattr(torch, ns.dtype)
    configs = {name: CANDIDATE_CONFIGS[name] for name in ns.configs.split(",")}
    hbm = hbm_gbps(torch.device("cuda"))
    print(torch.cuda.get_device_name(), "torch", torch.__version__, f"HBM copy {hbm:.0f} GB/s, x {ns.dtype}",
          flush=True)
    gen = torch.Generator("cuda").manual_seed(0)
    results = {}
    print("| matrix | kernel | us/call | GB/s | % HBM copy | max err / max |")
    print("|---|---|---|---|---|---|")
    for shape, (out, inp) in SHAPES.items():
        results[shape] = sweep_shape(out, inp, configs, dtype, ns.weights, ns.replays, hbm, gen)
        for name, r in results[shape].items():
            print(f"| {shape} {out}x{inp} | {name} | {r['us']:.2f} | {r['gbps']:.0f} | {r['hbm_pct']:.1f} | "
                  f"{r['error']:.1e} |", flush=True)
    print()
    for shape, rows in results.items():
        best = min(configs, key=lambda name: rows[name]["us"])
        print(f"best for {shape}: {best} {rows[best]['us']:.2f} us ({rows[best]['hbm_pct']:.1f}% of HBM copy), "
              f"tinygemm {rows['tinygemm']['us']:.2f} us")
    step_ms = {name: LAYERS * sum(rows[name]["us"] for rows in results.values()) / 1e3
               for name in [*configs, "tinygemm", "fp16 F.linear"]}
    single = min(configs, key=step_ms.get)
    per_shape = LAYERS * sum(min(rows[name]["us"] for name in configs) for rows in results.values()) / 1e3
    print(f"7B step, {LAYERS} x (wqkv + wo + w13 + w2): best single config {single} {step_ms[single]:.3f} ms, "
          f"best config per matrix {per_shape:.3f} ms, tinygemm {step_ms['tinygemm']:.3f} ms, "
          f"fp16 F.linear {step_ms['fp16 F.linear']:.3f} ms")
    if ns.json:
        Path(ns.json).write_text(json.dumps(dict(hbm_gbps=hbm, dtype=ns.dtype, results=results, step_ms=step_ms,
                                                 best_single=single, best_per_matrix_ms=per_shape), indent=1))


if __name__ == "__main__":
    main()
