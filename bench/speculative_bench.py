"""Speculative decoding on the device: pass time vs tokens per pass, and real acceptance at real cost.

    python bench/speculative_bench.py --json out.json --markdown out.md [--modes stream_fp16,stream_int4,resident,cpu]

1. Pass time: the inflated twin (tools/inflate_model.py: Llama-2-7B block shape, 12.95 GB of fp16 blocks),
   streamed in fp16 and int4, one forward of a token tree of n tokens (random parents) after a context
   of --context tokens, for n in 1, 4, 16, 64, 256, 1024; median of --repeats passes. Goal: t(256) <= 1.15 t(1).
2. Decode: the twin of models/pytiny with models/pytiny-draft as its draft (plus prompt lookup), greedy, for
   (a) continuations of held-out standard-library files and (b) an edit workload (a held-out function,
   then its first line again under a new name: the reply rewrites the function). Plain decoding and
   speculation (the planner choosing) give the same tokens (checked), each timed after untimed replies to the
   same prompts (--warmup-tokens: a conversation's later replies find graphs captured, kernels compiled and
   the planner's measurements made; the first reply pays those once); reported: decode tok/s of each,
   tokens per target pass, and the multiple of the link limit (link GB/s / GB streamed per pass, measured
   in this run). Modes: stream_fp16, stream_int4, resident (fp16 on the GPU), cpu (--threads, the dtype app.py picks there;
   --cpu_quant int8|int4 quantizes its blocks as --quant does).
`--device cpu --dim 512 --layers 8 --ffn 1024` is a dry run of the code paths (streaming with synchronous copies).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.build import build_engine
from engine.choices import pick_dtype
from engine.config import BUNDLED_MODEL, RunConfig
from engine.cpu_decode import use_cpu_decode_blocks
from engine.flag_values import parse_device
from engine.llama_offload import offload_transformer, resident_transformer
from engine.speculative import MAX_TREE_TOKENS, default_tree_cap
from llama.generation import Generator
from llama.kv_cache import KVCache
from llama.loader import load_model
from llama.model import Transformer
from llama.sampling import Sampler, SamplingParams
from llama.speculative.decoder import Speculator
from llama.speculative.draft import DraftModel
from llama.speculative.lookup import PromptLookup
from llama.speculative.planner import Planner
from llama.speculative.tree import TokenTree, tree_attention, tree_paths
from llama.tokenizer import load_tokenizer
from llama.tree_rows import TreePass, TreeRows, check_dense_rows
from llama.loader import empty_model
from offload.kernels.linear import quantize_linears
from offload.link import probe_link_gbps
from offload.policy import OffloadConfig
from offload.quant_mode import QuantMode
from tools.inflate_model import inflate, inflated_args
from tools.speculation_workloads import continuation_prompts, edit_prompts

GREEDY = SamplingParams(temperature=0.0, repetition_penalty=1.0)
PASS_SIZES = (1, 4, 16, 64, 256, 1024)
DRAFT = BUNDLED_MODEL.parent / "pytiny-draft"


def build_twin(mode: str, ns: argparse.Namespace, device: torch.device):
    """(model, its offload state or None, dtype) of the twin in `mode`."""
    small = load_model(BUNDLED_MODEL, torch.float32, "cpu")
    quant = QuantMode.INT4 if mode == "stream_int4" else None
    dtype = torch.bfloat16 if mode == "stream_int4" else torch.float16
    if mode == "cpu":  # as app.py picks on this machine: float32 where it fits comfortably in RAM, else bfloat16
        dtype = pick_dtype("auto", torch.device("cpu"), inflated_args(small.args, ns.dim, ns.layers, ns.ffn))
    state, args = inflate(small.state_dict(), small.args, ns.dim, ns.layers, ns.ffn, dtype)
    args = replace(args, max_seq_len=ns.ctx)
    model = empty_model(args)
    if mode == "cpu":  # and as app.py runs it: one-token steps through the compiled CPU decode blocks
        model.load_state_dict(state, strict=True, assign=True)
        model.set_max_seq_len(ns.ctx)
        if ns.cpu_quant is not None:  # as --quant does on the CPU: the blocks' linears, and an int8 head copy
            quantize_linears(model.layers, QuantMode(ns.cpu_quant), progress=False)
        use_cpu_decode_blocks(model, int8_head=ns.cpu_quant is not None)
        print(f"cpu: {dtype}{f' + {ns.cpu_quant}' if ns.cpu_quant else ''}, {torch.get_num_threads()} threads",
              flush=True)
        return model.eval(), None, dtype
    config = OffloadConfig(dtype=dtype, device=device, exclusions=frozenset(), n_slots=ns.slots, max_seq_len=ns.ctx,
                           prefill_chunk=512, quant=quant, pin=device.type == "cuda")  # every block streamed
    if mode == "resident":  # as app.py places a model that fits: everything on the GPU, projections fused
        return resident_transformer(model, iter(state.items()), config, fuse=True), None, dtype
    return model, offload_transformer(model, iter(state.items()), config), dtype


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_tree(n: int, vocab: int, gen: torch.Generator) -> TokenTree:
    tree = TokenTree(int(torch.randint(vocab, (), generator=gen)))
    while len(tree) < n:
        parent = int(torch.randint(len(tree), (), generator=gen))
        tree.add(parent, int(torch.randint(vocab, (), generator=gen)))
    return tree


@torch.inference_mode()
def pass_times(model: Transformer, dtype: torch.dtype, device: torch.device, ns: argparse.Namespace) -> dict[str, dict]:
    """Seconds of one pass by tokens in it after ns.context cached tokens: "batched" (a prefill-like pass, every
    matmul over all rows at once) and "exact" (a tree pass as verification runs it on the GPU, each node getting
    its one-token step's bits: llama/tree_rows.py), up to the planner's cap."""
    args = model.args
    cache = KVCache(args, ns.ctx, dtype, device)
    gen = torch.Generator().manual_seed(0)
    context = torch.randint(args.vocab_size, (1, ns.context), generator=gen)
    for pos in range(0, ns.context, 512):
        model(context[:, pos : pos + 512], pos, cache, last_only=True)
    out: dict[str, dict] = {"batched": {}, "exact": {}}
    if device.type == "cuda":  # as Generator.tree_logits does before its first exact pass
        check_dense_rows(model, dtype, device)
    for n in PASS_SIZES:
        if ns.context + n > ns.ctx:
            continue
        tree = random_tree(n, args.vocab_size, gen)
        positions, mask = tree_attention(tree, ns.context, window=args.sliding_window)
        tokens = torch.tensor([tree.tokens])
        runs = {"batched": cache}
        if device.type == "cuda" and n <= (ns.tree_cap or MAX_TREE_TOKENS["cuda"]):
            rows = TreeRows(positions[None].to(device), tree_paths(tree, ns.context)[None].to(device))
            runs["exact"] = TreePass(cache, rows)
        for kind, over in runs.items():
            seconds, queued = _median_pass(lambda: model(tokens, ns.context, over, positions=positions, mask=mask),
                                           device, ns.repeats)
            out[kind][n] = seconds
            print(f"  {kind} pass of {n:5d} tokens: {1e3 * seconds:8.1f} ms ({seconds / out[kind][1]:.2f}x one "
                  f"token), host done queueing at {1e3 * queued:.1f} ms", flush=True)
    return out


def _median_pass(run, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median seconds of run() to the device's end, and to the host's (near the whole: the host is the limit)."""
    times, queued = [], []
    for _ in range(repeats + 1):  # the first is a warm-up
        _sync(device)
        begin = time.perf_counter()
        run()
        queued.append(time.perf_counter() - begin)
        _sync(device)
        times.append(time.perf_counter() - begin)
    return statistics.median(times[1:]), statistics.median(queued[1:])


def workloads(tokenizer, ns: argparse.Namespace) -> dict[str, list[list[int]]]:
    text = Path(ns.heldout).read_text(encoding="utf-8")
    return {"a_continuation": continuation_prompts(text, tokenizer, ns.prompts, ns.prompt_tokens),
            "b_edit": edit_prompts(text, tokenizer, ns.prompts)}


def decode(gen: Generator, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, list[list[int]]]:
    """(decode tok/s, tokens per target pass, outputs)."""
    tokens = passes = 0
    seconds = 0.0
    outputs = []
    for prompt in prompts:
        gen.reset()
        out = gen.generate(prompt, Sampler(GREEDY), new_tokens, stop_ids=set())
        tokens += out.stats.new_tokens - 1
        passes += out.stats.decode_passes
        seconds += out.stats.decode_seconds
        outputs.append(out.token_ids)
    return tokens / seconds, tokens / passes, outputs


def warm_up(gen: Generator, prompts: list[list[int]], ns: argparse.Namespace) -> None:
    """A short untimed reply to each prompt first, as a conversation's later replies find things: graphs
    captured for the tree sizes and cache buckets these prompts reach, kernels compiled, and (speculating) the
    planner's pass times and acceptance measured. What is still captured while timed is reported."""
    if ns.warmup_tokens:
        decode(gen, prompts, ns.warmup_tokens)


def graphs_captured(*gens: Generator) -> int:
    return sum(g.steps.captured for g in gens if g.steps is not None)


def run_mode(mode: str, ns: argparse.Namespace, device: torch.device, link: float | None) -> dict:
    target_device = torch.device("cpu") if mode == "cpu" else device
    model, off, dtype = build_twin(mode, ns, device)
    streamed = off.streamed_bytes if off is not None else 0
    row: dict = {"mode": mode, "streamed_gb": streamed / 1e9}
    limit = link * 1e9 / streamed if streamed and link else None
    row["link_limit_tok_s"] = limit
    if mode.startswith("stream"):
        row["pass_seconds"] = pass_times(model, dtype, target_device, ns)
    tokenizer = load_tokenizer(BUNDLED_MODEL)
    gen = Generator(model, tokenizer, target_device, ns.ctx, dtype, 512)
    draft_dtype = "float32" if target_device.type == "cpu" else "float16"
    draft = build_engine(RunConfig(model_dir=ns.draft, device=parse_device(str(target_device)), dtype=draft_dtype, ctx=ns.ctx,
                                   chat_format="raw"))
    for name, prompts in workloads(tokenizer, ns).items():
        gen.speculator = None
        warm_up(gen, prompts, ns)
        plain_tps, _, want = decode(gen, prompts, ns.new_tokens)
        planner = Planner(ns.tree_cap or default_tree_cap(gen), True, lambda line: print("  " + line, flush=True))
        gen.speculator = Speculator(DraftModel(draft.generator), PromptLookup(), planner, planner.announce)
        warm_up(gen, prompts, ns)
        gen.speculator.spent = dict.fromkeys(gen.speculator.spent, 0.0)
        captured = graphs_captured(gen, draft.generator)
        spec_tps, per_pass, got = decode(gen, prompts, ns.new_tokens)
        captured = graphs_captured(gen, draft.generator) - captured
        spent = gen.speculator.spent
        rounds = max(spent["rounds"], 1.0)
        row[name] = {
            "plain_tok_s": plain_tps, "spec_tok_s": spec_tps, "tokens_per_pass": per_pass,
            "speedup": spec_tps / plain_tps, "same_tokens": got == want,
            "x_link_limit": spec_tps / limit if limit else None,
            "ms_per_round": {k: 1e3 * spent[k] / rounds for k in ("draft", "target", "round")},
            "graphs_captured_while_timed": captured,
        }
        print(f"[{mode}] {name}: {json.dumps(row[name])}", flush=True)
    if off is not None:
        off.close()
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| mode | workload | plain tok/s | speculative tok/s | tokens/pass | speedup | x link limit | same tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        for name in ("a_continuation", "b_edit"):
            r = row[name]
            x = f"{r['x_link_limit']:.2f}" if r["x_link_limit"] else "-"
            lines.append(f"| {row['mode']} | {name} | {r['plain_tok_s']:.2f} | {r['spec_tok_s']:.2f} | "
                         f"{r['tokens_per_pass']:.2f} | {r['speedup']:.2f} | {x} | {r['same_tokens']} |")
    for row in rows:
        for kind, t in row.get("pass_seconds", {}).items():
            lines.append("")
            lines.append(f"{row['mode']} {kind} pass time (ms) by tokens in the pass: " + ", ".join(
                f"{n}: {1e3 * s:.1f} ({s / t[1]:.2f}x)" for n, s in t.items()))
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="stream_fp16,stream_int4,resident,cpu")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--ffn", type=int, default=11008)
    p.add_argument("--ctx", type=int, default=2304)
    p.add_argument("--context", type=int, default=1024, help="tokens in the cache before the timed passes")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--draft", type=Path, default=DRAFT)
    p.add_argument("--heldout", type=Path, default=Path("data/heldout_stdlib.txt"))
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=96)
    p.add_argument("--warmup-tokens", type=int, help="an untimed reply of this many tokens to each prompt first "
                   "(default: --new-tokens, so that the timed replies capture no graph; 0: none)")
    p.add_argument("--slots", type=int, default=2, help="device slots in the streamed modes' ring, as --prefetch")
    p.add_argument("--tree-cap", type=int, help="tokens per target pass the planner may use, as --draft_tokens "
                   "(default: the engine's own cap)")
    p.add_argument("--threads", type=int, default=16, help="CPU threads in the cpu mode")
    p.add_argument("--cpu_quant", choices=("int8", "int4"), help="the cpu mode's blocks quantized, as --quant does")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    ns = p.parse_args()
    for flag, value, least in (("--slots", ns.slots, 1), ("--tree-cap", ns.tree_cap, 2)):
        if value is not None and value < least:
            p.error(f"{flag} must be at least {least}, got {value}")
    if ns.warmup_tokens is None:
        ns.warmup_tokens = ns.new_tokens
    torch.set_num_threads(ns.threads)
    device = torch.device(ns.device)
    link = probe_link_gbps(device, pin=True) if device.type == "cuda" else None
    print(f"link {link} GB/s" if link else "no link (CPU dry run)", flush=True)
    rows = []
    for mode in ns.modes.split(","):
        print(f"== {mode}", flush=True)
        rows.append(run_mode(mode, ns, device, link))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if ns.json:
        ns.json.write_text(json.dumps({"link_gbps": link, "rows": rows}, indent=2))
    text = markdown(rows)
    if ns.markdown:
        ns.markdown.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
