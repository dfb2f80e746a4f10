"""Continuous batching: aggregate and per-stream decode tok/s for 1, 4, 8, 16, 64 concurrent streams.

    python bench/batch_bench.py --mode cpu                     # the bundled model (models/pytiny) on the CPU
    python bench/batch_bench.py --mode stream_fp16|stream_int4|resident [--streams 1,4,16,64]   # on CUDA

Drives the library's BatchDecoder directly (no HTTP). For each stream count n, n greedy requests of
--prompt random tokens are submitted and admitted (each prefilled alone, as the server does); once all n
decode together, --steps decode steps are timed: aggregate = n x steps / time, per stream = steps / time.
Also timed: the Generator decoding one sequence alone (the single-conversation path, no batching).

CUDA modes use the Llama-2-7B block shape (dim 4096, 32 layers, FFN 11008, random weights made on the GPU
as bench/offload_bench.py makes them; the bundled tokenizer's vocabulary of 6144): everything streamed in
fp16, everything streamed in int4 (bf16 compute), or everything resident in fp16. Streamed rows also give
the link limit of one stream (link GB/s / GB streamed per pass, the link measured in this run).
Goals (issue 12): streamed, 16 streams >= 12x the single stream's aggregate and each stream >= 0.75x its
speed; CPU, 8 streams >= 3x. `--device cpu` with a small shape (--dim 256 --layers 2 --ffn 512) is a dry run
of the CUDA modes' code paths.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from offload_bench import synthetic_weights  # noqa: E402

from engine.config import BUNDLED_MODEL  # noqa: E402
from engine.llama_offload import offload_transformer  # noqa: E402
from engine.llama_units import BLOCK_LINEARS  # noqa: E402
from llama.batch_decoder import BatchDecoder  # noqa: E402
from llama.batch_job import Job  # noqa: E402
from llama.config import ModelArgs  # noqa: E402
from llama.generation import Generator  # noqa: E402
from llama.loader import empty_model, load_model  # noqa: E402
from llama.model import Transformer  # noqa: E402
from llama.sampling import Sampler, SamplingParams  # noqa: E402
from llama.slot_cache import SlotKVCache  # noqa: E402
from llama.tokenizer import load_tokenizer  # noqa: E402
from offload.link import probe_link_gbps  # noqa: E402
from offload.placement import OffloadedModel  # noqa: E402
from offload.policy import OffloadConfig  # noqa: E402
from offload.quant_mode import QuantMode  # noqa: E402

MODES = ("cpu", "stream_fp16", "stream_int4", "resident")
GREEDY = SamplingParams(temperature=0.0, repetition_penalty=1.0)


@dataclass
class Row:
    streams: int
    aggregate: float  # tok/s of all streams together
    per_stream: float  # tok/s each stream got


def build(mode: str, ns: argparse.Namespace, device: torch.device, slots: int
          ) -> tuple[Transformer, torch.dtype, OffloadedModel | None]:
    """(model, dtype, its offload state: None on the CPU) for `mode`."""
    if mode == "cpu":
        dtype = getattr(torch, ns.dtype)
        return load_model(BUNDLED_MODEL, dtype=dtype, device="cpu").eval(), dtype, None
    vocab = load_tokenizer(BUNDLED_MODEL).vocab_size
    args = ModelArgs(dim=ns.dim, n_layers=ns.layers, n_heads=ns.dim // 128, vocab_size=vocab, ffn_dim=ns.ffn,
                     max_seq_len=ns.ctx)
    quant = QuantMode.INT4 if mode == "stream_int4" else None
    dtype = torch.bfloat16 if quant is QuantMode.INT4 else torch.float16  # torch's int4 GEMM is bf16-only
    exclusions = frozenset(BLOCK_LINEARS) if mode == "resident" else frozenset()
    config = OffloadConfig(dtype=dtype, device=device, exclusions=exclusions, n_slots=2, max_seq_len=ns.ctx,
                           kv_sequences=slots, prefill_chunk=ns.prompt, quant=quant, pin=device.type == "cuda")
    model = empty_model(args)
    return model, dtype, offload_transformer(model, synthetic_weights(args, device), config)


def decoder_for(model: Transformer, dtype: torch.dtype, device: torch.device, slots: int, ctx: int) -> BatchDecoder:
    cache = SlotKVCache(model.args, slots, ctx, dtype, device)
    tokenizer = load_tokenizer(BUNDLED_MODEL)
    return BatchDecoder(Generator(model, tokenizer, device, ctx, dtype, 512, cache=cache.slot(0)), cache)


def measure(decoder: BatchDecoder, prompts: list[list[int]], n: int, ns: argparse.Namespace) -> Row:
    """Admit n streams, then time ns.steps decode steps with all n decoding together."""
    ended = False
    budget = n + ns.warmup + ns.steps + 2  # tokens each stream may need: the admission of the others too
    for i in range(n):
        job = Job(prompts[i % len(prompts)], Sampler(GREEDY), budget, stop_ids=set())
        decoder.submit(job, should_stop=lambda: ended)
    while len(decoder.decoding) < n:
        decoder.step()
    for _ in range(ns.warmup):
        decoder.step()
    start = time.perf_counter()
    for _ in range(ns.steps):
        decoder.step()  # each step ends with the logits on the host: the device has finished
    seconds = time.perf_counter() - start
    assert len(decoder.decoding) == n, "a stream ended during the timed steps"
    ended = True
    decoder.drain()
    return Row(n, n * ns.steps / seconds, ns.steps / seconds)


def generator_alone(decoder: BatchDecoder, prompt: list[int], steps: int) -> float:
    """Decode tok/s of the Generator's own single-sequence path (slot 0, nothing else running)."""
    gen = decoder.generator
    gen.reset()
    return gen.generate(prompt, Sampler(GREEDY), steps + 1, stop_ids=set()).stats.decode_tps


def markdown(mode: str, rows: list[Row], alone: float, limit: float | None, header: str) -> str:
    single = rows[0]
    columns = "| streams | aggregate tok/s | per-stream tok/s | x 1-stream aggregate | per-stream / 1-stream |"
    lines = [header, "", columns + (" aggregate / 1-stream link limit |" if limit else ""),
             "|---|---|---|---|---|" + ("---|" if limit else "")]
    for r in rows:
        lines.append(f"| {r.streams} | {r.aggregate:.2f} | {r.per_stream:.2f} | {r.aggregate / single.aggregate:.2f} | "
                     f"{r.per_stream / single.per_stream:.2f} |" + (f" {r.aggregate / limit:.2f} |" if limit else ""))
    lines.append("")
    lines.append(f"Generator alone (one sequence, its plain decode path): {alone:.2f} tok/s; "
                 f"the scheduler's 1 stream: {single.per_stream:.2f} tok/s")
    by_n = {r.streams: r for r in rows}
    goals = [(16, 12.0, 0.75)] if mode != "cpu" else [(8, 3.0, None)]
    for n, agg_goal, per_goal in goals:
        if n in by_n:
            r = by_n[n]
            verdict = f"{n} streams: {r.aggregate / single.aggregate:.2f}x the 1-stream aggregate (goal >= {agg_goal})"
            if per_goal is not None:
                verdict += f", each stream {r.per_stream / single.per_stream:.2f}x (goal >= {per_goal})"
            lines.append(verdict)
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=MODES, default="cpu")
    p.add_argument("--streams", default="1,4,8,16,64")
    p.add_argument("--device", default="cuda", help="for the CUDA modes (cpu: a dry run)")
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--ctx", type=int, default=256, help="positions per slot")
    p.add_argument("--prompt", type=int, default=32, help="tokens per prompt")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per stream count")
    p.add_argument("--dtype", default="float32", help="cpu mode: float32 or bfloat16")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--markdown", type=Path)
    ns = p.parse_args()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    counts = [int(n) for n in ns.streams.split(",")]
    device = torch.device("cpu" if ns.mode == "cpu" else ns.device)
    model, dtype, off = build(ns.mode, ns, device, max(counts))
    streamed = off.streamed_bytes if off is not None else 0
    decoder = decoder_for(model, dtype, device, max(counts), ns.ctx)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.args.vocab_size, (ns.prompt,), generator=gen).tolist() for _ in range(8)]
    measure(decoder, prompts, 1, ns)  # warm-up: kernels, allocator, the first pass of each shape
    rows = []
    for n in counts:
        rows.append(measure(decoder, prompts, n, ns))
        r = rows[-1]
        print(f"[{ns.mode}] {n} streams: {r.aggregate:.2f} tok/s aggregate, {r.per_stream:.2f} per stream", flush=True)
    alone = generator_alone(decoder, prompts[0], ns.steps)
    link = probe_link_gbps(device, True, 512 * 2**20, repeats=5) if streamed and device.type == "cuda" else None
    limit = link * 1e9 / streamed if link else None
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    shape = "models/pytiny" if ns.mode == "cpu" else f"dim {ns.dim}, {ns.layers} layers, FFN {ns.ffn}, random weights"
    header = (f"{time.strftime('%Y-%m-%d')}, {card}, torch {torch.__version__}; {ns.mode} ({shape}, {str(dtype)[6:]}); "
              f"prompt {ns.prompt}, {ns.steps} timed steps"
              + (f"; {streamed / 1e9:.2f} GB streamed per pass, link {link:.1f} GB/s -> 1-stream limit "
                 f"{limit:.2f} tok/s" if limit else "")
              + f"; command: python bench/batch_bench.py {' '.join(sys.argv[1:])}")
    text = markdown(ns.mode, rows, alone, limit, header)
    if ns.markdown:
        ns.markdown.write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
