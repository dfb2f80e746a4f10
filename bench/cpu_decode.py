"""CPU decode speed: our model vs Hugging Face transformers on the same weights, same machine, same run.

    python bench/cpu_decode.py [--dim 768 --layers 12 --heads 12 --kv_heads 4 --ffn 2048 --vocab 32000]
                               [--dtype float32|bfloat16] [--threads N] [--tokens 64] [--repeats 5]

Random weights (speed does not depend on values). Both run greedy decode with their own KV cache
after the same 32-token prompt; the median of --repeats runs is reported, with the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llama.config import ModelArgs  # noqa: E402
from llama.kv_cache import KVCache  # noqa: E402
from llama.loader import load_model  # noqa: E402


def _ours(model, prompt: torch.Tensor, n: int) -> float:
    cache = KVCache(model.args, prompt.shape[1] + n + 1, model.output.weight.dtype)
    with torch.inference_mode():
        tok = model(prompt, 0, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for i in range(n):
            tok = model(tok, prompt.shape[1] + i, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        return n / (time.perf_counter() - start)


def _hf(model, prompt: torch.Tensor, n: int) -> float:
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.inference_mode():
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(n):
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv_heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    import transformers

    args = ModelArgs(dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads, vocab_size=a.vocab,
                     ffn_dim=a.ffn, max_seq_len=1024)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in args.to_hf_config().items() if k != "architectures"})
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).to(dtype).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        ours = load_model(Path(tmp), dtype=dtype)
    prompt = torch.randint(0, a.vocab, (1, 32))
    params = sum(p.numel() for p in hf.parameters())
    print(f"model: dim {a.dim}, {a.layers} layers, heads {a.heads}/{a.kv_heads}, ffn {a.ffn}, vocab {a.vocab}, "
          f"{params / 1e6:.0f}M params, {a.dtype}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, {a.threads} threads")
    _ours(ours, prompt, 4), _hf(hf, prompt, 4)  # warm up
    ours_tps, hf_tps = [], []
    for _ in range(a.repeats):  # interleaved, so drifts in machine load hit both alike
        ours_tps.append(_ours(ours, prompt, a.tokens))
        hf_tps.append(_hf(hf, prompt, a.tokens))
    o, h = statistics.median(ours_tps), statistics.median(hf_tps)
    print(f"| engine | decode tok/s (median of {a.repeats}) |\n|---|---|")
    print(f"| ours | {o:.2f} |\n| transformers | {h:.2f} |\n| ratio ours/transformers | {o / h:.2f}x |")


if __name__ == "__main__":
    main()
