"""Perplexity through one-token decode steps: what the int8 head and the avx512_vnni int4 path on the CPU,
and our CUDA int4 kernel (both round x to int8 per 32 inputs, in passes of up to 8 tokens) cost in quality.
`app.py --ppl` runs whole chunks at once, which never takes those paths, so it cannot show them.

    python bench/decode_perplexity.py [--model models/pytiny] [--text data/heldout_stdlib.txt] [--ctx 256]
                                      [--chunks 40] [--threads 2] [--device cuda]

llama/perplexity.py's convention: chunks of --ctx tokens, BOS first, positions ctx/2 .. ctx-2 scored; here
the first half is prefilled and every scored position is one decode step through the KV cache. Rows:
float32; int4 blocks (`--quant int4`, groups of 128) with the float32 head and exact activations (before);
with the int8 head; with the int8 head and the avx512_vnni path (where this CPU has it). With --device cuda:
bfloat16; int4 through tinygemm (exact activations); int4 through our kernel with the block route a resident
run installs (engine/int4_block_step.py).
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.cpu_decode import use_cpu_decode_blocks  # noqa: E402
from engine.fused_projections import fuse_projections  # noqa: E402
from engine.int4_block_step import int4_block_step  # noqa: E402
from llama.kv_cache import KVCache  # noqa: E402
from llama.loader import load_model  # noqa: E402
from llama.model import Transformer  # noqa: E402
from llama.tokenizer import load_tokenizer  # noqa: E402
from offload.kernels import cpu_extension, int4_gemv_cuda  # noqa: E402
from offload.kernels.linear import prepare_linears_for_cuda, quantize_linears  # noqa: E402
from offload.quant_mode import QuantMode  # noqa: E402


@torch.inference_mode()
def decode_perplexity(model: Transformer, ids: list[int], bos: int, ctx: int, chunks: int) -> float:
    first, nll, scored = ctx // 2, 0.0, 0
    device, dtype = model.tok_embeddings.weight.device, model.tok_embeddings.weight.dtype
    for c in range(chunks):
        chunk = torch.tensor(ids[c * ctx : (c + 1) * ctx], device=device)
        chunk[0] = bos
        cache = KVCache(model.args, ctx, dtype, device)
        logits = [model(chunk[None, : first + 1], 0, cache, last_only=True)[0, -1]]
        for pos in range(first + 1, ctx - 1):
            logits.append(model(chunk[None, pos : pos + 1], pos, cache, last_only=True)[0, -1])
        nll += F.cross_entropy(torch.stack(logits).float(), chunk[first + 1 :], reduction="sum").item()
        scored += ctx - 1 - first
    return math.exp(nll / scored)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path("models/pytiny"))
    p.add_argument("--text", type=Path, default=Path("data/heldout_stdlib.txt"))
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--chunks", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tokenizer = load_tokenizer(a.model)
    ids = tokenizer.encode(a.text.read_text(encoding="utf-8"), bos=True)
    if len(ids) < a.ctx * a.chunks:
        raise SystemExit(f"{a.text}: {len(ids)} tokens, fewer than {a.chunks} chunks of {a.ctx}")
    rows = cuda_rows(a, ids, tokenizer.bos_id) if a.device == "cuda" else cpu_rows(a, ids, tokenizer.bos_id)
    print(f"{a.model} on {a.device}, {a.chunks} chunks of {a.ctx}, {a.chunks * (a.ctx - 1 - a.ctx // 2)} scored "
          "decode steps")
    print("| model | perplexity | vs the first row |\n|---|---|---|")
    for name, ppl in rows:
        print(f"| {name} | {ppl:.4f} | {100 * (ppl / rows[0][1] - 1):+.3f}% |")


def cuda_rows(a: argparse.Namespace, ids: list[int], bos: int) -> list[tuple[str, float]]:
    base = load_model(a.model, dtype=torch.bfloat16).eval().to("cuda")
    rows = [("bfloat16", decode_perplexity(base, ids, bos, a.ctx, a.chunks))]
    for name, kernel in (("int4, tinygemm (exact activations)", "0"), ("int4, our kernel and block route", "1")):
        os.environ[int4_gemv_cuda.SWITCH] = kernel
        int4_gemv_cuda._load_once.cache_clear()
        model = copy.deepcopy(base)
        quantize_linears(model.layers, QuantMode.INT4, progress=False)
        fuse_projections(model)
        prepare_linears_for_cuda(model.layers, "cuda")
        for block in model.layers:
            block.fast_path = int4_block_step  # as a resident load installs it
        rows.append((name, decode_perplexity(model, ids, bos, a.ctx, a.chunks)))
        del model
    return rows


def cpu_rows(a: argparse.Namespace, ids: list[int], bos: int) -> list[tuple[str, float]]:
    ext = cpu_extension()
    if ext is None:
        raise SystemExit("the CPU kernels did not build: nothing to measure")
    base = load_model(a.model, dtype=torch.float32).eval()
    paths = ext.cpu_paths()
    exact = [name for name in paths if name != "avx512_vnni"]
    int4 = copy.deepcopy(base)
    quantize_linears(int4.layers, QuantMode.INT4, progress=False)
    rows = []  # (name, perplexity)
    for name, model, int8_head, on in (("float32", base, False, paths),
                                       ("int4, float32 head (before)", int4, False, exact),
                                       ("int4, int8 head", int4, True, exact),
                                       ("int4, int8 head, avx512_vnni", int4, True, paths)):
        if on is paths and name != "float32" and "avx512_vnni" not in paths:
            continue  # this CPU has no such path
        fused = copy.deepcopy(model)
        use_cpu_decode_blocks(fused, int8_head=int8_head)
        ext.set_cpu_paths(on)
        rows.append((name, decode_perplexity(fused, ids, bos, a.ctx, a.chunks)))
        ext.set_cpu_paths(paths)
    return rows


if __name__ == "__main__":
    main()
