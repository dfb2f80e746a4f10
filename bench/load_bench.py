"""Filling the pinned host store from a page-cached checkpoint: GB/s and peak host RSS, per fill method.

    python bench/load_bench.py [--dir /tmp/load_bench_7b] [--json out.json]

Writes (once) a synthetic Hugging Face checkpoint of the Llama-2-7B shape in fp16 (12.95 GB of block
weights; the values do not change the speed), reads it once so that it sits in the page cache, then
loads it with --use_offload's path (everything streamed) once per fill method, each in a fresh process
so that its peak RSS is its own (bench/host_memory.py: VmHWM, not ru_maxrss). Goal (issue 9): >= 4 GB/s,
peak RSS <= 1.1x the streamed bytes.
`--device cpu --layers 2 --dim 256 --ffn 688` is a dry run of the code paths (nothing is pinned).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.host_memory import PeakSampler, status_bytes  # noqa: E402
from engine.llama_offload import build_offloaded_model  # noqa: E402
from llama.checkpoint_writer import write_hf_checkpoint  # noqa: E402
from llama.config import ModelArgs  # noqa: E402
from offload.host import FillMethod  # noqa: E402
from offload.policy import OffloadConfig  # noqa: E402

METHODS = {
    "pin_first": FillMethod(pin_after_fill=False),  # what the app did before issue 9: 0.7 GB/s on the H200
    "pin_after": FillMethod(),
    "pin_first_8threads": FillMethod(pin_after_fill=False, threads=8),
    "pin_after_8threads": FillMethod(threads=8),
}


def make_checkpoint(args: ModelArgs, out: Path) -> None:
    if (out / "config.json").is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    state = {name: torch.full(shape, 0.01, dtype=torch.float16) for name, shape in args.weight_shapes().items()}
    write_hf_checkpoint(state, args, out, max_shard_bytes=5 * 10**9)


def warm_page_cache(directory: Path) -> float:
    """Read every file once; returns GB/s of that read (a cold read is disk speed, a warm one RAM speed)."""
    start, n = time.perf_counter(), 0
    for f in sorted(directory.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(64 * 2**20):
                n += len(chunk)
    return n / (time.perf_counter() - start) / 1e9


def load_once(directory: Path, method: str, device: str) -> dict[str, float | str | bool]:
    """One whole --use_offload load in this process (link probe included): seconds, GB/s of the store, and
    host memory against the streamed bytes: the peak RSS the load added (VmHWM less the RSS before it, CUDA
    already initialized), the process's whole peak, and the most memory locked or pinned at once."""
    config = OffloadConfig(dtype=torch.float16, device=torch.device(device), exclusions=frozenset(),
                           max_seq_len=256, prefill_chunk=256, fill=METHODS[method], verbose=False)
    if config.device.type == "cuda":
        torch.empty(1, device=config.device)  # the CUDA context's own memory stays out of the load's figure
    before = status_bytes().get("VmRSS", 0)  # torch and friends, before any weight
    start = time.perf_counter()
    with PeakSampler() as sampled:
        _, off = build_offloaded_model(directory, config)
    seconds = time.perf_counter() - start
    status = status_bytes()
    store = off.store.nbytes
    # A kernel without VmHWM (some sandboxes): the sampled maximum of VmRSS instead, said in the row.
    peak = status.get("VmHWM") or sampled.peak.get("VmRSS", 0)
    row = {"method": method, "seconds": seconds, "store_gb": store / 1e9, "gbps": store / seconds / 1e9,
           "peak_source": "VmHWM" if "VmHWM" in status else "sampled VmRSS",
           "peak_rss_over_streamed": (peak - before) / store,
           "peak_process_rss_over_streamed": peak / store,
           "rss_after_over_streamed": (status.get("VmRSS", 0) - before) / store,
           "sampled_peak_rss_gb": sampled.peak.get("VmRSS", 0) / 1e9,
           "peak_locked_gb": sampled.peak.get("VmLck", 0) / 1e9, "peak_pinned_gb": sampled.peak.get("VmPin", 0) / 1e9,
           "pinned": off.store.pinned}
    off.close()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("/tmp/load_bench_7b"))
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--device", default="cuda")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--json", type=Path)
    p.add_argument("--one", help=argparse.SUPPRESS)  # child mode: load once with this method, print a JSON row
    ns = p.parse_args()
    if ns.one:
        print(json.dumps(load_once(ns.dir, ns.one, ns.device)))
        return
    args = ModelArgs(dim=ns.dim, n_layers=ns.layers, n_heads=ns.heads, vocab_size=ns.vocab, ffn_dim=ns.ffn)
    make_checkpoint(args, ns.dir)
    print(f"page cache: read at {warm_page_cache(ns.dir):.1f} GB/s; again at {warm_page_cache(ns.dir):.1f} GB/s",
          flush=True)
    rows = []
    for method in ns.methods.split(","):
        child = subprocess.run([sys.executable, __file__, "--dir", str(ns.dir), "--device", ns.device, "--one", method],
                               capture_output=True, text=True)
        if child.returncode != 0:
            print(f"[{method}] failed: {child.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    card = torch.cuda.get_device_name() if ns.device.startswith("cuda") else "cpu"
    print(f"\n{time.strftime('%Y-%m-%d')}, {card}; command: python bench/load_bench.py {' '.join(sys.argv[1:])}\n")
    print("| fill method | store GB | seconds | GB/s | peak RSS added / streamed (VmHWM) | whole process peak / "
          "streamed | RSS after / streamed | peak locked GB (VmLck) | peak pinned GB (VmPin) | pinned |\n"
          "|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['store_gb']:.2f} | {r['seconds']:.1f} | {r['gbps']:.2f} | "
              f"{r['peak_rss_over_streamed']:.3f} | {r['peak_process_rss_over_streamed']:.3f} | "
              f"{r['rss_after_over_streamed']:.3f} | {r['peak_locked_gb']:.2f} | {r['peak_pinned_gb']:.2f} | "
              f"{r['pinned']} |")
    if ns.json:
        ns.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
