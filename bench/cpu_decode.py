"""CPU decode speed of a real shape: ours with fused decode blocks, ours unfused (as before the swap), and
Hugging Face transformers, on the same weights, same machine, same run.

    python bench/cpu_decode.py [--shape smollm2-135m|small] [--modes float32 bfloat16 int8 int4 int8+bf16 int4+bf16]
                               [--threads N] [--tokens 64] [--repeats 5] [--wait_idle SECONDS]

Random weights (speed does not depend on values; shapes in bench/shapes.py). Each engine runs greedy
decode with its own KV cache after the same 32-token prompt; the median of --repeats runs is reported, the
engines taking turns so that drifts in machine load hit all alike. int8 and int4 are `--quant int8|int4`
(block linears quantized, the head read from an int8 copy, activations in float32, as app.py runs them on the
CPU by default),
int8+bf16 and int4+bf16 the same with `--dtype bfloat16` (activations, head and int4 scales in bfloat16);
transformers has no CPU counterpart for those, so its column is empty there. On a machine shared with
others, --wait_idle makes each run first wait (up to SECONDS) for a second in which the CPUs were idle.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from idle_wait import wait_until_idle  # noqa: E402
from shapes import SHAPES  # noqa: E402

from engine.cpu_decode import use_cpu_decode_blocks  # noqa: E402
from llama.kv_cache import KVCache  # noqa: E402
from llama.loader import load_model  # noqa: E402
from llama.model import Transformer  # noqa: E402
from offload.kernels.linear import quantize_linears  # noqa: E402
from offload.quant_mode import QuantMode  # noqa: E402

MODES = ("float32", "bfloat16", "int8", "int4", "int8+bf16", "int4+bf16")
DEFAULT_MODES = MODES[:4]
PROMPT_TOKENS = 32
Decoder = Callable[[int], float]  # tokens to decode -> tokens per second


def ours(model: Transformer, layers: nn.ModuleList, prompt: torch.Tensor) -> Decoder:
    def decode(n: int) -> float:
        model.layers = layers
        cache = KVCache(model.args, prompt.shape[1] + n + 1, model.output.weight.dtype)
        with torch.inference_mode():
            tok = model(prompt, 0, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            for i in range(n):
                tok = model(tok, prompt.shape[1] + i, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
            return n / (time.perf_counter() - start)

    return decode


def transformers_decoder(model, prompt: torch.Tensor) -> Decoder:
    from transformers import DynamicCache

    def decode(n: int) -> float:
        cache = DynamicCache()
        with torch.inference_mode():
            out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            for _ in range(n):
                out = model(input_ids=tok, past_key_values=cache, use_cache=True)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
            return n / (time.perf_counter() - start)

    return decode


def median_tps(decoders: dict[str, Decoder], tokens: int, repeats: int, wait_idle: float) -> dict[str, float]:
    for decode in decoders.values():
        decode(4)  # warm up
    runs: dict[str, list[float]] = {name: [] for name in decoders}
    for _ in range(repeats):  # interleaved
        for name, decode in decoders.items():
            if wait_idle:
                wait_until_idle(wait_idle)
            runs[name].append(decode(tokens))
    return {name: statistics.median(tps) for name, tps in runs.items()}


def mode_decoders(mode: str, checkpoint: Path, hf, prompt: torch.Tensor) -> dict[str, Decoder]:
    dtype = torch.bfloat16 if "bf" in mode else torch.float32
    model = load_model(checkpoint, dtype=dtype)
    if mode.startswith("int"):
        quantize_linears(model.layers, QuantMode(mode.removesuffix("+bf16")), progress=False)
    unfused = nn.ModuleList(list(model.layers))
    if use_cpu_decode_blocks(model, int8_head=mode.startswith("int")) != len(unfused):
        raise SystemExit("the CPU kernels did not build or do not take these blocks; nothing fused to measure")
    decoders = {"ours": ours(model, model.layers, prompt), "ours unfused": ours(model, unfused, prompt)}
    if mode in ("float32", "bfloat16"):
        decoders["transformers"] = transformers_decoder(hf.to(dtype), prompt)
    return decoders


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), choices=MODES)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--wait_idle", type=float, default=0.0, metavar="SECONDS",
                   help="before each run wait up to this long for the CPUs to be idle (machines shared with others)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import transformers

    args = SHAPES[a.shape]
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in args.to_hf_config().items() if k != "architectures"})
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    prompt = torch.randint(0, args.vocab_size, (1, PROMPT_TOKENS))
    params = sum(p.numel() for p in hf.parameters())
    print(f"shape {a.shape}: dim {args.dim}, {args.n_layers} layers, heads {args.n_heads}/{args.n_kv_heads}, "
          f"ffn {args.ffn_dim}, vocab {args.vocab_size}, {params / 1e6:.0f}M params; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {a.threads} threads, {a.tokens} tokens after a "
          f"{PROMPT_TOKENS}-token prompt, median of {a.repeats}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        for mode in a.modes:
            tps = median_tps(mode_decoders(mode, Path(tmp), hf, prompt), a.tokens, a.repeats, a.wait_idle)
            rows.append((mode, tps))
            print(f"{mode}: " + ", ".join(f"{name} {v:.2f}" for name, v in tps.items()) + " tok/s", flush=True)
    print("\n| mode | ours tok/s | ours unfused | transformers | ours / unfused | ours / transformers |")
    print("|---|---|---|---|---|---|")
    for mode, tps in rows:
        hf_tps = tps.get("transformers")
        hf_cells = (f"{hf_tps:.2f}", f"{tps['ours'] / hf_tps:.2f}x") if hf_tps else ("-", "-")
        print(f"| {mode} | {tps['ours']:.2f} | {tps['ours unfused']:.2f} | {hf_cells[0]} | "
              f"{tps['ours'] / tps['ours unfused']:.2f}x | {hf_cells[1]} |")

if __name__ == "__main__":
    main()
