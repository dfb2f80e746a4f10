"""Our one-token int4 kernel (offload/kernels/int4_gemv_cuda.py) beside tinygemm and cuBLAS, Llama-2-7B shapes.

    python bench/int4_gemv_bench.py [--shapes 1,2,...] [--tokens 1,4,8] [--markdown out.md]

Per matrix: microseconds of one call, each call on the next of WEIGHTS fresh random weights (more bytes than
the L2 holds, as in a decode step), 20 calls captured in a CUDA graph and replayed (the launch gaps a graphed
step has), median of --repeats replays; beside the bytes each reads over the device-to-device copy bandwidth
measured in the same run. bfloat16 x and scales, groups of 128, as `--quant int4` runs. Each launch shape
(warps a block, rows a group, chunks in flight, warps a group) is timed for one token; each matrix's chosen one
(launch_shape) for --tokens, and for one token with what the block route adds to its launch (norm, residual, gate).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.decode_bench import hbm_gbps  # noqa: E402
from offload.kernels.int4_format import Int4Weight  # noqa: E402
from offload.kernels.int4_gemv_cuda import SWITCH, int4_gemv, int4_gemv_library  # noqa: E402
from offload.kernels.int4_gemv_cuda import SHAPES as LAUNCH_SHAPES  # noqa: E402
from offload.kernels.tinygemm import int4_matmul_tinygemm, prepare_for_cuda  # noqa: E402

SHAPES = {"wqkv": (12288, 4096), "wo": (4096, 4096), "w13": (22016, 4096), "w2": (4096, 11008)}
WEIGHTS = 8
CALLS = 20
GROUP = 128


def graphed_us(call, repeats: int) -> float:
    """Median microseconds per call of CALLS calls (call(i) uses weight i % WEIGHTS) replayed in a graph."""
    for i in range(3):
        call(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            call(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    return statistics.median(times)


def random_int4(out: int, inp: int, gen: torch.Generator) -> Int4Weight:
    groups = inp // GROUP
    return Int4Weight(
        packed=torch.randint(0, 256, (out, inp // 2), generator=gen, device="cuda", dtype=torch.uint8),
        scales=(torch.rand(out, groups, generator=gen, device="cuda") * 0.02 + 0.001).to(torch.bfloat16),
        zeros=torch.randint(0, 16, (out, groups), generator=gen, device="cuda").to(torch.bfloat16))


def _as_the_block_route_calls(name: str, x: torch.Tensor, out: int, gen: torch.Generator) -> dict:
    """What engine/int4_block_step.py adds to this matrix's launch: the norm before wqkv and w13 (w13 gated), the
    residual after wo and w2 (RoPE and the cache write after wqkv are left out)."""
    norm = (1 + 0.1 * torch.randn(x.shape[1], generator=gen, device="cuda")).to(x.dtype), 1e-5
    residual = torch.randn(x.shape[0], out, generator=gen, device="cuda").to(x.dtype)
    return {"wqkv": dict(norm=norm), "w13": dict(norm=norm, gated=True)}.get(name, dict(residual=residual))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(map(str, LAUNCH_SHAPES)), help="launch shapes, each timed for one token")
    p.add_argument("--tokens", default="1,4,8", help="token counts timed with each matrix's chosen shape")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--markdown")
    ns = p.parse_args()
    os.environ.pop(SWITCH, None)
    if int4_gemv_library() is None:
        sys.exit("int4_gemv_bench: the CUDA int4 kernel did not build here (see the warning above)")
    hbm = hbm_gbps(torch.device("cuda"))
    variants = [(int(s), 1) for s in ns.shapes.split(",")] + [(None, int(t)) for t in ns.tokens.split(",")]
    lines = [f"{torch.cuda.get_device_name()}, torch {torch.__version__}, HBM copy {hbm:.0f} GB/s; us per call "
             "(% of the copy bandwidth)", "",
             "| matrix | " + " | ".join(f"ours shape {s or 'chosen'}, {t} tok" for s, t in variants)
             + " | chosen, 1 tok, with the block route's norm / residual / gate | tinygemm | cuBLAS bf16 (4x the bytes) |",
             "|---|" + "---|" * (len(variants) + 3)]
    totals = dict.fromkeys([*variants, "route", "tinygemm", "dense"], 0.0)
    for name, (out, inp) in SHAPES.items():
        gen = torch.Generator("cuda").manual_seed(out + inp)
        weights = [random_int4(out, inp, gen) for _ in range(WEIGHTS)]
        xs = torch.randn(max(t for _, t in variants), inp, generator=gen, device="cuda").to(torch.bfloat16)
        x = xs[:1]
        int4_bytes = weights[0].packed.numel() + 4 * weights[0].scales.numel()
        cells = []
        for shape, tokens in variants:
            us = graphed_us(lambda i, s=shape, t=tokens: int4_gemv(xs[:t], weights[i % WEIGHTS], s), ns.repeats)
            totals[shape, tokens] += us
            cells.append(f"{us:.2f} ({100 * int4_bytes / (us * 1e-6) / 1e9 / hbm:.1f}%)")
        extra = _as_the_block_route_calls(name, x, out, gen)
        us = graphed_us(lambda i: int4_gemv(x, weights[i % WEIGHTS], **extra), ns.repeats)
        totals["route"] += us
        cells.append(f"{us:.2f} ({100 * int4_bytes / (us * 1e-6) / 1e9 / hbm:.1f}%)")
        tiny = [prepare_for_cuda(w) for w in weights]
        us = graphed_us(lambda i: int4_matmul_tinygemm(x, tiny[i % WEIGHTS]), ns.repeats)
        totals["tinygemm"] += us
        cells.append(f"{us:.2f} ({100 * int4_bytes / (us * 1e-6) / 1e9 / hbm:.1f}%)")
        del tiny
        dense = [torch.randn(out, inp, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        us = graphed_us(lambda i: F.linear(x, dense[i % 4]), ns.repeats)
        totals["dense"] += us
        cells.append(f"{us:.2f} ({100 * 2 * out * inp / (us * 1e-6) / 1e9 / hbm:.1f}%)")
        del dense, weights
        lines.append(f"| {name} {out}x{inp} | " + " | ".join(cells) + " |")
    lines.append("| 7B step (32 layers), ms | " + " | ".join(f"{32 * totals[k] / 1e3:.2f}" for k in totals) + " |")
    text = "\n".join(lines)
    print(text)
    if ns.markdown:
        Path(ns.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
