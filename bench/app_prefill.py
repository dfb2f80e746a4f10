"""Prefill through the app's own engine with --use_offload: tok/s beside the rate the link allows.

    python bench/app_prefill.py --dir /tmp/load_bench_7b --tokenizer models/pytiny/tokenizer.model \
        --run 3GiB:4096:1024,3900 --run 6GiB:8448:8000

Each --run is GPU_MEM:CTX:PROMPT_LENGTHS: one engine built as app.py builds it (--use_offload --gpu_mem
GPU_MEM --ctx CTX, float16, the chunk chosen from the budget), then for every length a prompt of random ids
prefilled `--repeats` times by the Generator (chunks before the last run through the blocks only, queued
without waiting for the GPU) and by the loop it replaced (every chunk a whole forward whose logits are
copied back), alternately; medians. The first prefill in the process is reported alone too ("cold": an app
run's first reply; what CUDA loads then is loaded by the Generator's warm-up while the engine is built).

Link-allowed rate: prompt tokens / (passes x streamed bytes per pass / the link GB/s measured at load);
pass-allowed: the same with a one-token forward's measured time as the pass time. The checkpoint is
bench/load_bench.py's synthetic Llama-2-7B shape (written if absent). `--device cpu` is a dry run of the
code paths on a resident CPU engine (no link figures).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.load_bench import make_checkpoint, warm_page_cache  # noqa: E402
from engine.build import Engine, build_engine  # noqa: E402
from engine.config import DeviceSpec, RunConfig  # noqa: E402
from engine.flag_values import parse_size  # noqa: E402
from llama.config import ModelArgs  # noqa: E402
from llama.generation import GenerationStats  # noqa: E402
from llama.sampling_params import SamplingParams  # noqa: E402


def build(model_dir: Path, tokenizer: Path, device: str, gpu_mem: str, ctx: int) -> Engine:
    streaming = device == "cuda"
    cfg = RunConfig(model_dir=model_dir, tokenizer=tokenizer, device=DeviceSpec(device), dtype="float16", ctx=ctx,
                    chat_format="raw", sampling=SamplingParams(temperature=0.0), use_offload=streaming,
                    gpu_mem=parse_size(gpu_mem) if streaming else None)
    return build_engine(cfg)


def sync(engine: Engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


def generator_prefill(engine: Engine, prompt: list[int]) -> float:
    """Seconds of the Generator's prefill of the whole prompt (nothing reused from the cache)."""
    engine.generator.reset()
    stats = GenerationStats()
    engine.generator.prefill(prompt, stats)
    return stats.prefill_seconds


@torch.inference_mode()
def every_chunk_forward(engine: Engine, prompt: list[int]) -> float:
    """Seconds of the loop the Generator ran before: each chunk a forward with its last logits copied back."""
    gen = engine.generator
    gen.reset()
    sync(engine)
    start = time.perf_counter()
    for pos in range(0, len(prompt), gen.prefill_chunk):
        tokens = torch.tensor([prompt[pos : pos + gen.prefill_chunk]], device=engine.device)
        engine.model(tokens, pos, gen.cache, last_only=True)[0, -1].float().cpu()
    sync(engine)
    return time.perf_counter() - start


@torch.inference_mode()
def one_token_pass(engine: Engine, pos: int) -> float:
    """Seconds of one forward of one token: a whole pass over the streamed weights."""
    sync(engine)
    start = time.perf_counter()
    engine.model(torch.tensor([[5]], device=engine.device), pos, engine.generator.cache, last_only=True)
    sync(engine)
    return time.perf_counter() - start


def measure_run(engine: Engine, lengths: list[int], repeats: int, cold: list[float]) -> list[dict]:
    rows = []
    gen = engine.generator
    off = engine.offloaded
    vocab = engine.tokenizer.vocab_size
    pass_s = None
    for n in lengths:
        prompt = [1] + torch.randint(3, vocab, (n - 1,), generator=torch.Generator().manual_seed(n)).tolist()
        if not cold:  # the process's first forward after building, as an app run's first reply
            cold.append(generator_prefill(engine, prompt))
            cold_tps = n / cold[0]
        else:
            cold_tps = None
        pass_s = pass_s or statistics.median(one_token_pass(engine, 0) for _ in range(3))
        new, old = [], []
        for _ in range(repeats):
            new.append(generator_prefill(engine, prompt))
            old.append(every_chunk_forward(engine, prompt))
        passes = math.ceil(n / gen.prefill_chunk)
        row = {"prompt": n, "chunk": gen.prefill_chunk, "passes": passes, "new_tps": n / statistics.median(new),
               "old_tps": n / statistics.median(old), "cold_new_tps": cold_tps, "pass_seconds": pass_s,
               "pass_allowed_tps": n / (passes * pass_s), "new_runs_s": new, "old_runs_s": old}
        if off is not None and off.link_gbps:
            row["streamed_gb_per_pass"] = off.streamed_bytes / 1e9
            row["link_gbps"] = off.link_gbps
            row["head_on_gpu"] = off.plan.head_on_gpu
            row["link_allowed_tps"] = n / (passes * off.streamed_bytes / (off.link_gbps * 1e9))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=Path("/tmp/load_bench_7b"))
    p.add_argument("--tokenizer", type=Path, default=Path("models/pytiny/tokenizer.model"))
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--run", action="append", help="GPU_MEM:CTX:LENGTHS, e.g. 3GiB:4096:1024,3900")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", type=Path)
    ns = p.parse_args()
    args = ModelArgs(dim=ns.dim, n_layers=ns.layers, n_heads=ns.dim // 128, vocab_size=32000, ffn_dim=ns.ffn,
                     max_seq_len=8448)
    make_checkpoint(args, ns.dir)
    print(f"page cache: read at {warm_page_cache(ns.dir):.1f} GB/s", flush=True)
    rows, cold = [], []
    for spec in ns.run or ["3GiB:4096:1024,3900"]:
        gpu_mem, ctx, lengths = spec.split(":")
        engine = build(ns.dir, ns.tokenizer, ns.device, gpu_mem, int(ctx))
        for row in measure_run(engine, [int(n) for n in lengths.split(",")], ns.repeats, cold):
            rows.append({"gpu_mem": gpu_mem, "ctx": int(ctx), **row})
        if engine.offloaded is not None:
            engine.offloaded.close()
        del engine
        torch.cuda.empty_cache() if ns.device == "cuda" else None
    card = torch.cuda.get_device_name() if ns.device == "cuda" else "cpu"
    print(f"\n{time.strftime('%Y-%m-%d')}, {card}; command: python bench/app_prefill.py {' '.join(sys.argv[1:])}\n")
    print("| --gpu_mem | ctx | chunk | prompt | passes | before tok/s (every chunk's logits) | now tok/s | "
          "link-allowed tok/s | now / link-allowed | pass-allowed tok/s | now / pass-allowed | cold first prefill tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        allowed = r.get("link_allowed_tps")
        link = f"{allowed:.0f} | {r['new_tps'] / allowed:.1%}" if allowed else "- | -"
        cold_tps = f"{r['cold_new_tps']:.0f}" if r["cold_new_tps"] else "-"
        print(f"| {r['gpu_mem']} | {r['ctx']} | {r['chunk']} | {r['prompt']} | {r['passes']} | {r['old_tps']:.0f} | "
              f"{r['new_tps']:.0f} | {link} | {r['pass_allowed_tps']:.0f} | {r['new_tps'] / r['pass_allowed_tps']:.1%} | "
              f"{cold_tps} |")
    if ns.json:
        ns.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
