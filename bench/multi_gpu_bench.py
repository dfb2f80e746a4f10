"""Decode over several GPUs (issue 15): the Llama-2-7B shape (random fp16 weights) streamed on one card and
split across two, each card's link measured in the same run, the planner's prediction beside each figure.

    python bench/multi_gpu_bench.py [--budget_gib 5] [--quant int4] [--seconds 5] [--markdown out.md]

With 2+ GPUs visible: cards 0 and 1, each given --budget_gib (one card alone gets the same budget, so both
runs stream), then the ratio of two cards to one beside the goal (>= 1.8x) and whether the greedy tokens are
identical. With one GPU: the [cuda:0, cuda:0] variant (two rings and copy streams sharing one card and link),
which checks the split's tokens and overheads, not a speed-up; the table says so. `--device cpu` is a dry run
of the code paths on a small shape (both "devices" the CPU, no links, no speeds worth reading).
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
from shapes import SHAPES  # noqa: E402

from engine.llama_offload import offload_transformer  # noqa: E402
from llama.config import ModelArgs  # noqa: E402
from llama.kv_cache import KVCache  # noqa: E402
from llama.loader import empty_model  # noqa: E402
from offload.link import probe_link_gbps  # noqa: E402
from offload.policy import OffloadConfig  # noqa: E402
from offload.quant_mode import QuantMode  # noqa: E402
from offload.split_run import SplitOffloadedModel  # noqa: E402

GiB = 2**30
LLAMA2_7B = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, ffn_dim=11008, max_seq_len=4096)
PROMPT_TOKENS = 16
GOAL = 1.8


@dataclass
class Run:
    label: str
    streamed_gb: float  # per token, all cards together
    predicted_tps: float | None
    decode_tps: float
    tokens: list[int]


def sync(devices: tuple[torch.device, ...]) -> None:
    for d in set(devices):
        if d.type == "cuda":
            torch.cuda.synchronize(d)


@torch.inference_mode()
def decode(model, cache: KVCache, args: ModelArgs, devices: tuple[torch.device, ...], n: int) -> tuple[float, list[int]]:
    """Greedy tokens/s over n timed steps after a prefill and two warm-up steps, and every token chosen."""
    prompt = torch.randint(0, args.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    token = model(prompt, 0, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)  # (1, 1)
    chosen, pos = [token], PROMPT_TOKENS
    for _ in range(2):
        token = model(token, pos, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        chosen.append(token)
        pos += 1
    sync(devices)
    start = time.perf_counter()
    for _ in range(n):
        token = model(token, pos, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        chosen.append(token)
        pos += 1
    sync(devices)
    seconds = time.perf_counter() - start
    return n / seconds, [int(t) for t in chosen]


def run(label: str, args: ModelArgs, config: OffloadConfig, dtype: torch.dtype, seconds: float) -> Run:
    model = empty_model(args)
    maker = config.devices[0] if config.devices else config.device
    off = offload_transformer(model, synthetic_weights(args, maker, dtype=dtype), config)
    try:
        devices = off.block_devices if isinstance(off, SplitOffloadedModel) else (off.device,)
        predicted = off.plan.predicted_tps() if isinstance(off, SplitOffloadedModel) else off.plan.predicted_tps(
            off.link_gbps)
        ctx = config.max_seq_len
        cache = KVCache(args, ctx, dtype, devices if len(devices) > 1 else devices[0])
        room = ctx - PROMPT_TOKENS - 3
        n = min(room, max(8, round(seconds * predicted))) if predicted else min(room, 8)
        tps, tokens = decode(model, cache, args, devices, n)
        return Run(label, off.streamed_bytes / 1e9, predicted, tps, tokens)
    finally:
        off.close()


def table(runs: list[Run], links: dict[torch.device, float | None], note: str) -> str:
    lines = [f"multi-GPU decode ({note}); links: "
             + ", ".join(f"{d} {g:.1f} GB/s" if g else f"{d} not measured" for d, g in links.items()), "",
             "| run | streamed GB/token | predicted tok/s | measured tok/s | measured / predicted |",
             "|---|---|---|---|---|"]
    for r in runs:
        pred = f"{r.predicted_tps:.2f}" if r.predicted_tps else "-"
        frac = f"{r.decode_tps / r.predicted_tps:.0%}" if r.predicted_tps else "-"
        lines.append(f"| {r.label} | {r.streamed_gb:.2f} | {pred} | {r.decode_tps:.2f} | {frac} |")
    one, two = runs
    ratio = two.decode_tps / one.decode_tps
    same = "identical" if one.tokens == two.tokens else "DIFFERENT"
    lines += ["", f"two / one: {ratio:.2f}x measured (goal >= {GOAL}x)"
              + (f", {two.predicted_tps / one.predicted_tps:.2f}x predicted" if one.predicted_tps and two.predicted_tps
                 else "") + f"; greedy tokens {same} ({len(one.tokens)} tokens)"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget_gib", type=float, default=5.0, help="VRAM budget of each card (forces streaming)")
    p.add_argument("--quant", choices=("int8", "int4"))
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--seconds", type=float, default=5.0, help="about this long of timed decoding per run")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--markdown", type=Path)
    ns = p.parse_args()
    if ns.device == "cpu":
        cpu = torch.device("cpu")
        args, dtype, devices, note = SHAPES["small"], torch.float32, (cpu, cpu), "CPU dry run: both devices the CPU"
    else:
        count = torch.cuda.device_count()
        args, dtype = LLAMA2_7B, torch.float16
        if count >= 2:
            devices, note = (torch.device("cuda", 0), torch.device("cuda", 1)), f"{torch.cuda.get_device_name(0)} x2"
        else:
            devices = (torch.device("cuda", 0),) * 2
            note = "ONE GPU: the [cuda:0, cuda:0] variant, sharing one link; a check of the split, not of a speed-up"
    links = {d: probe_link_gbps(d, True) if d.type == "cuda" else None for d in dict.fromkeys(devices)}
    budget = int(ns.budget_gib * GiB)
    quant = QuantMode(ns.quant) if ns.quant else None
    common = {"dtype": dtype, "max_seq_len": ns.ctx, "prefill_chunk": PROMPT_TOKENS, "quant": quant}
    one = OffloadConfig(device=devices[0], gpu_mem=budget, **common)
    two = OffloadConfig(device=devices[0], devices=devices, device_budgets=(budget, budget), **common)
    runs = [run(f"1 card, {ns.budget_gib:g} GiB", args, one, dtype, ns.seconds),
            run(f"2 cards, {ns.budget_gib:g} GiB each", args, two, dtype, ns.seconds)]
    text = table(runs, links, note)
    print(text)
    if ns.markdown:
        ns.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
