"""int4 decode-sized matmuls on the GPU: our Triton small-batch kernel against tinygemm (its layout made
once, and made per call as streamed weights need it) and dequantize + cuBLAS, beside the HBM bandwidth
measured in the same run (a 4 GiB device-to-device copy).

    python bench/int4_kernels_bench.py [--tokens 1,4,16] [--markdown out.md]

Llama-2-7B's block matrices (q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008), group 128, bf16,
random weights. "weight GB/s" is the packed bytes plus scales and zeros over the median time of 50 calls.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from offload.kernels.int4_format import quantize_int4  # noqa: E402
from offload.kernels.int4_triton import dequantize_int4, int4_small_batch  # noqa: E402
from offload.kernels.tinygemm import int4_matmul_tinygemm, prepare_for_cuda  # noqa: E402

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))


def _median_seconds(fn, runs: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_gbps() -> float:
    """Read + write bytes per second of a 4 GiB device-to-device copy."""
    src = torch.empty(1 << 31, dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / _median_seconds(lambda: dst.copy_(src), runs=10) / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,4,16")
    p.add_argument("--markdown", type=Path)
    ns = p.parse_args()
    hbm = copy_gbps()
    lines = [f"HBM copy: {hbm:.0f} GB/s (read + write), {torch.cuda.get_device_name()}", "",
             "| weight | tokens | ours ms | tinygemm (made once) ms | tinygemm (made per call) ms | "
             "dequant+cuBLAS ms | ours weight GB/s | of HBM copy |", "|---|---|---|---|---|---|---|---|"]
    for out, inp in SHAPES:
        gen = torch.Generator().manual_seed(out + inp)
        w = quantize_int4(torch.randn(out, inp, generator=gen), 128, scale_dtype=torch.bfloat16).to("cuda")
        prepared = prepare_for_cuda(w)
        nbytes = sum(t.numel() * t.element_size() for t in w.tensors().values())
        for tokens in (int(t) for t in ns.tokens.split(",")):
            x = torch.randn(tokens, inp, device="cuda", dtype=torch.bfloat16)
            ours = _median_seconds(lambda: int4_small_batch(x, w))
            once = _median_seconds(lambda: int4_matmul_tinygemm(x, prepared))
            per_call = _median_seconds(lambda: int4_matmul_tinygemm(x, prepare_for_cuda(w)))
            dequant = _median_seconds(lambda: x @ dequantize_int4(w, x.dtype).T)
            gbps = nbytes / ours / 1e9
            lines.append(f"| {out}x{inp} | {tokens} | {ours * 1e3:.3f} | {once * 1e3:.3f} | {per_call * 1e3:.3f} | "
                         f"{dequant * 1e3:.3f} | {gbps:.0f} | {gbps / hbm:.0%} |")
    print("\n".join(lines))
    if ns.markdown:
        ns.markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
