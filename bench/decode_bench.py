"""Resident decode speed on the GPU beside the HBM limit measured in the same run: CUDA graphs on and off.

    python bench/decode_bench.py --json out.json --markdown out.md [--modes fp16,int4,pytiny,app,compile]

- The limit: a device-to-device copy of 4 GiB, ten times; its bandwidth counts the bytes read plus those
  written. A decode step reads every weight once (one row of the embedding) and the KV cache over its
  bucket, so tok/s cannot exceed bandwidth / those bytes.
- fp16, int4: the Llama-2-7B shape (dim 4096, 32 layers, FFN 11008, vocab 32000), random weights, resident
  (int4: groups of 128 in tinygemm's layout, bfloat16), q/k/v and gate/up fused as app.py fuses them.
  Greedy decode through the Generator with graphs on, off (the same steps op by op: --no_graphs), the
  model's plain forward per token with the logits copied back (the decode path before the steps), and graphs
  with llama/fused_ops.py held to its torch references (the step before the fused kernels). Each step's
  kernels, by name, with their count and device time, go to stderr and the json.
- pytiny: the bundled 14M model, fp16, the same three ways.
- app: app.py as a user runs it (`--prompt ... --max_new_tokens 128`) on a random fp16 checkpoint of the
  7B shape written to --ckpt (vocabulary of the bundled tokenizer), as it is and with `--quant int4`, and the
  bundled model, with graphs,
  and `--baseline DIR`'s app.py (a checkout before this work) the same way: the decode tok/s each prints.
- compile: the same step under torch.compile(mode="reduce-overhead") instead of our graphs (fp16 7B):
  its compile time, then tok/s.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.decode_models import LLAMA2_7B, resident_int4_model, resident_model, write_checkpoint  # noqa: E402
from engine.config import BUNDLED_MODEL  # noqa: E402
from engine.fused_projections import fuse_projections  # noqa: E402
from llama import fused_ops  # noqa: E402
from llama.config import ModelArgs  # noqa: E402
from llama.decode_graphs import kv_bucket  # noqa: E402
from llama.generation import GenerationStats, Generator  # noqa: E402
from llama.kv_cache import KVCache  # noqa: E402
from llama.loader import load_model  # noqa: E402
from llama.model import Transformer  # noqa: E402
from llama.sampling import Sampler, SamplingParams  # noqa: E402
from llama.slot_cache import BatchStep  # noqa: E402
from offload.kernels.int4_gemv_cuda import int4_gemv_library  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, repetition_penalty=1.0)
CTX = 1024
PROMPT_LEN, WARMUP = 32, 8  # decode stays in the 256 bucket: every timed step costs the same
APP_PROMPT = "def parse_args(argv):\n    parser = argparse.ArgumentParser("


@dataclass
class Row:
    model: str
    mode: str
    tokens: int
    tps: float
    limit_tps: float | None
    same_tokens: bool | None = None  # graphs on and off chose the same tokens
    note: str = ""

    @property
    def fraction(self) -> float | None:
        return self.tps / self.limit_tps if self.limit_tps else None


def hbm_gbps(device: torch.device, gib: int = 4, reps: int = 10) -> float:
    src = torch.empty(gib * 2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    end.synchronize()
    seconds = begin.elapsed_time(end) / 1e3
    del src, dst
    torch.cuda.empty_cache()
    return 2 * gib * 2**30 * reps / seconds / 1e9


def bytes_per_token(model: Transformer, dtype: torch.dtype, bucket: int) -> int:
    """Weights a step reads (blocks, final norm, head, one embedding row) plus its bucket of the KV cache."""
    args = model.args
    read = itertools.chain(model.layers.parameters(), model.layers.buffers(), model.norm.parameters(),
                           model.output.parameters())
    weights = sum(t.numel() * t.element_size() for t in read)
    row = model.tok_embeddings.weight[0]
    kv = 2 * args.n_layers * args.n_kv_heads * bucket * args.head_dim * dtype.itemsize
    return weights + row.numel() * row.element_size() + kv


def _prompt(args: ModelArgs) -> list[int]:
    return torch.randint(3, args.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0)).tolist()


def generator_tps(model: Transformer, dtype: torch.dtype, graphs: bool, n: int) -> tuple[float, list[int]]:
    """Greedy decode through the Generator's own loop (without detokenizing): tok/s and the tokens."""
    gen = Generator(model, None, "cuda", CTX, dtype, graphs=graphs)  # type: ignore[arg-type]  # no text here
    prompt, stats = _prompt(model.args), GenerationStats()
    history = list(prompt)
    tokens = gen._decode_tokens(gen.prefill(prompt, stats), Sampler(GREEDY), history, stats)
    for _ in range(WARMUP):  # graph capture happens here
        history.append(next(tokens))
    begin = time.perf_counter()
    for _ in range(n):
        history.append(next(tokens))  # each waits for its step: the token id crossed back
    seconds = time.perf_counter() - begin
    tokens.close()
    del gen
    torch.cuda.empty_cache()
    return n / seconds, history[PROMPT_LEN:]


@torch.inference_mode()
def forward_tps(model: Transformer, dtype: torch.dtype, n: int) -> float:
    """The model's forward per token at the exact kv length, logits copied back (the loop before the steps)."""
    cache = KVCache(model.args, CTX, dtype, "cuda")
    prompt = _prompt(model.args)
    logits = model(torch.tensor([prompt], device="cuda"), 0, cache, last_only=True)
    token, pos = int(logits[0, -1].float().cpu().argmax()), PROMPT_LEN
    for i in range(WARMUP + n):
        if i == WARMUP:
            begin = time.perf_counter()
        logits = model(torch.tensor([[token]], device="cuda"), pos, cache, last_only=True)
        token, pos = int(logits[0, -1].float().cpu().argmax()), pos + 1
    return n / (time.perf_counter() - begin)


def model_rows(name: str, model: Transformer, dtype: torch.dtype, hbm: float, n: int, n_slow: int) -> list[Row]:
    limit = hbm * 1e9 / bytes_per_token(model, dtype, kv_bucket(PROMPT_LEN + WARMUP + n, CTX))
    on, on_tokens = generator_tps(model, dtype, True, n)
    off, off_tokens = generator_tps(model, dtype, False, n_slow)
    same = on_tokens[: len(off_tokens)] == off_tokens
    before = forward_tps(model, dtype, n_slow)
    with fused_ops.references_only():  # the step before llama/fused_ops.py's kernels, in the same process
        unfused, _ = generator_tps(model, dtype, True, n)
    return [Row(name, "graphs", n, on, limit, same), Row(name, "no_graphs", n_slow, off, limit, same),
            Row(name, "model forward per token", n_slow, before, limit),
            Row(name, "graphs, torch ops unfused (before)", n, unfused, limit)]


def kernel_counts(model: Transformer, dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """CUDA kernels one uncaptured step launches (what a graph replays), by name: how many and their device time
    (us): where a step's time goes, besides the gaps between launches."""
    gen = Generator(model, None, "cuda", CTX, dtype, graphs=False)  # type: ignore[arg-type]
    gen.steps.decode(5, PROMPT_LEN)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        gen.steps.decode(5, PROMPT_LEN)
        torch.cuda.synchronize()
    kernels: dict[str, dict[str, float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(e.name[:80], {"count": 0, "us": 0.0})
            k["count"] += 1
            k["us"] += e.device_time_total
    return dict(sorted(kernels.items(), key=lambda kv: -kv[1]["us"]))


def kernel_summary(kernels: dict[str, dict[str, float]]) -> str:
    count = sum(int(k["count"]) for k in kernels.values())
    us = sum(k["us"] for k in kernels.values())
    top = "; ".join(f"{k['count']}x {name[:50]} {k['us']:.0f} us" for name, k in list(kernels.items())[:8])
    return f"{count} kernels, {us:.0f} us of kernel time per step: {top}"


def compiled_tps(model: Transformer, dtype: torch.dtype, n: int) -> tuple[float, float]:
    """torch.compile(mode="reduce-overhead") of the one-token step: (compile seconds, tok/s)."""
    cache = KVCache(model.args, CTX, dtype, "cuda")
    for t in cache.keys + cache.values:
        torch._dynamo.mark_static_address(t)  # written inside the graph: must keep its address
    bucket = kv_bucket(PROMPT_LEN + WARMUP + n, CTX)

    def step(tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        batch = BatchStep(cache, positions, bucket)  # type: ignore[arg-type]
        logits = model(tokens, 0, batch, positions=positions, mask=batch.mask(model.args.sliding_window))
        return logits.argmax(-1)

    compiled = torch.compile(step, mode="reduce-overhead")
    tokens = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    positions = torch.zeros(1, 1, dtype=torch.long, device="cuda")
    with torch.inference_mode():
        model(torch.tensor([_prompt(model.args)], device="cuda"), 0, cache)
        begin = time.perf_counter()
        token, pos = 5, PROMPT_LEN
        for i in range(WARMUP + n):
            if i == 3:  # compiled, then a warm-up run and the recording of the graph
                compile_seconds = time.perf_counter() - begin
                print(f"compile: {compile_seconds:.1f} s", file=sys.stderr)
            if i == WARMUP:
                begin = time.perf_counter()
            tokens.fill_(token)
            positions.fill_(pos)
            token, pos = int(compiled(tokens, positions)[0, -1]), pos + 1
    return compile_seconds, n / (time.perf_counter() - begin)


def app_row(model: str, label: str, app_dir: Path, ckpt: Path, extra: list[str]) -> Row:
    """app.py in a subprocess, as a user runs it: the decode tok/s it prints."""
    cmd = [sys.executable, str(app_dir / "app.py"), str(ckpt), "--prompt", APP_PROMPT, "--max_new_tokens", "128",
           "--temperature", "0", "--chat_format", "raw", "--ctx", str(CTX), *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(app_dir), os.environ.get("PYTHONPATH", "")])}
    begin = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=app_dir, env=env, timeout=400)
    wall = time.perf_counter() - begin
    m = re.search(r"decode (\d+) tok at ([\d.]+) tok/s", r.stderr)
    if r.returncode != 0 or m is None:
        return Row(model, label, 0, 0.0, None, note=f"failed: {r.stderr.strip().splitlines()[-1:]}")
    return Row(model, label, int(m.group(1)), float(m.group(2)), None, note=f"process {wall:.1f} s")


def table(rows: list[Row], hbm: float) -> str:
    out = [f"HBM copy bandwidth (read + write) {hbm:.0f} GB/s; {torch.cuda.get_device_name()}, torch {torch.__version__}",
           "", "| model | decode path | tokens | tok/s | HBM limit tok/s | of limit | same tokens on/off | note |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        limit = f"{r.limit_tps:.0f}" if r.limit_tps else "-"
        frac = f"{100 * r.fraction:.1f}%" if r.fraction else "-"
        same = "-" if r.same_tokens is None else ("yes" if r.same_tokens else "NO")
        out.append(f"| {r.model} | {r.mode} | {r.tokens} | {r.tps:.1f} | {limit} | {frac} | {same} | {r.note} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default="fp16,int4,pytiny,app", help="fp16, int4, pytiny, app, compile")
    p.add_argument("--tokens", type=int, default=200, help="timed tokens with graphs")
    p.add_argument("--slow_tokens", type=int, default=48, help="timed tokens without graphs")
    p.add_argument("--ckpt", type=Path, default=Path("/tmp/decode_bench_7b"), help="where the app's checkpoint goes")
    p.add_argument("--baseline", type=Path, help="a checkout before this work: its app.py is timed too")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    ns = p.parse_args()
    modes = ns.modes.split(",")
    device = torch.device("cuda")
    hbm = hbm_gbps(device)
    print(f"HBM copy bandwidth: {hbm:.0f} GB/s", file=sys.stderr)
    args = ModelArgs(**LLAMA2_7B, max_seq_len=CTX)
    rows: list[Row] = []
    kernels: dict[str, dict[str, int]] = {}
    compile_seconds = None
    for mode in (m for m in modes if m in ("fp16", "int4", "compile")):
        model = resident_model(args, torch.float16, device) if mode != "int4" else resident_int4_model(args, device)
        dtype = torch.float16 if mode != "int4" else torch.bfloat16
        name = f"7B {mode}" if mode != "int4" else f"7B int4 ({'our kernel' if int4_gemv_library() else 'tinygemm'})"
        try:
            if mode == "compile":
                compile_seconds, tps = compiled_tps(model, dtype, ns.tokens)
                limit = hbm * 1e9 / bytes_per_token(model, dtype, kv_bucket(PROMPT_LEN + WARMUP + ns.tokens, CTX))
                rows.append(Row("7B fp16", "torch.compile reduce-overhead", ns.tokens, tps, limit,
                                note=f"compile {compile_seconds:.0f} s"))
            else:
                kernels[mode] = kernel_counts(model, dtype)
                with fused_ops.references_only():
                    kernels[f"{mode} unfused"] = kernel_counts(model, dtype)
                for key in (mode, f"{mode} unfused"):
                    print(f"{key}: {kernel_summary(kernels[key])}", file=sys.stderr)
                rows += model_rows(name, model, dtype, hbm, ns.tokens, ns.slow_tokens)
        except Exception:  # noqa: BLE001  # one mode failing must not lose the others' figures
            traceback.print_exc()
            rows.append(Row(name, "failed", 0, 0.0, None, note="see the log"))
        print(table(rows, hbm), file=sys.stderr)
        del model
        torch.cuda.empty_cache()
    if "pytiny" in modes:
        tiny = load_model(BUNDLED_MODEL, torch.float16, device)
        fuse_projections(tiny)
        rows += model_rows("pytiny 14M", tiny, torch.float16, hbm, ns.tokens, ns.tokens)
    if "app" in modes:
        ckpt = write_checkpoint(ModelArgs(**{**LLAMA2_7B, "vocab_size": 6144}, max_seq_len=CTX), BUNDLED_MODEL,
                                ns.ckpt, device)
        runs = (("7B fp16 app.py", ckpt, ["--f16"]), ("7B int4 app.py", ckpt, ["--f16", "--quant", "int4"]),
                ("pytiny app.py", BUNDLED_MODEL, ["--f16"]))
        for name, model_dir, flags in runs:
            rows.append(app_row(name, "graphs", ROOT, model_dir, flags))
            if ns.baseline is not None:
                rows.append(app_row(name, "baseline checkout", ns.baseline.resolve(), model_dir, flags))
    md = table(rows, hbm)
    print(md)
    if ns.markdown:
        ns.markdown.write_text(md + "\n")
    if ns.json:
        ns.json.write_text(json.dumps({"hbm_gbps": hbm, "rows": [asdict(r) | {"fraction": r.fraction} for r in rows],
                                       "kernels_per_step": kernels, "compile_seconds": compile_seconds}, indent=1))


if __name__ == "__main__":
    main()
