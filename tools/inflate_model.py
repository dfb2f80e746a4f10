"""Inflate a small Llama into a larger one that predicts the same tokens: a model of real size with real acceptance.

Speculative decoding is judged on tokens accepted per pass (which needs a trained model and its draft)
at the cost of a pass over a big model's weights (which needs a big model). The bundled model is
trained but tiny; a random 7B-shaped model costs the right amount but predicts nothing. The twin is both:

- every tensor of the small model sits in the top-left corner of a larger zero tensor, so the extra
  residual dimensions stay exactly zero through the original blocks;
- RMSNorm divides by the root mean square over the larger width, sqrt(D/d) times smaller than over the
  original d dims, so norm weights are scaled by sqrt(d/D) and eps by d/D: each norm gives the same
  output as the small model's, exactly in real arithmetic;
- head_dim is kept (RoPE unchanged) and the query heads grow to dim / head_dim; the twin has one KV head
  per query head (as Llama-2-7B does), each original query head's KV head copied into its own slot;
- extra blocks, appended after the original ones, have random weights (they cost what real blocks cost)
  and output projections (wo, w2) of scale `residual_scale`, small enough to leave the residual stream
  essentially unchanged.

The vocabulary stays the small model's (its tokenizer is copied), so the head costs less than a 32k
vocabulary would; every block costs exactly what a block of the target shape costs.

    python -m tools.inflate_model --src models/pytiny --out /tmp/pytiny-7b   # Llama-2-7B's block shape
"""
from __future__ import annotations

import argparse
import math
import shutil
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch

from llama.checkpoint import iter_weights, read_model_args
from llama.checkpoint_writer import write_hf_checkpoint
from llama.config import ModelArgs

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def inflated_args(small: ModelArgs, dim: int, n_layers: int, ffn_dim: int) -> ModelArgs:
    if dim < small.dim or n_layers < small.n_layers or ffn_dim < small.ffn_dim:
        raise ValueError("the twin must be at least as large as the model in every size")
    if dim % small.head_dim:
        raise ValueError(f"dim {dim} is not a multiple of head_dim {small.head_dim}")
    n_heads = dim // small.head_dim
    return replace(
        small,
        dim=dim,
        n_layers=n_layers,
        ffn_dim=ffn_dim,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=small.head_dim,
        norm_eps=small.norm_eps * small.dim / dim,
    )


def _corner(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """t in the leading corner of a zero tensor of `shape`."""
    out = torch.zeros(shape, dtype=t.dtype)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def _kv_per_query_head(t: torch.Tensor, small: ModelArgs) -> torch.Tensor:
    """wk/wv (n_kv * hd, d) or their biases (n_kv * hd,) -> n_heads * hd rows: query head h gets KV head h // group."""
    group = small.n_heads // small.n_kv_heads
    heads = t.reshape(small.n_kv_heads, small.head_dim, *t.shape[1:])  # (n_kv, hd[, d])
    return heads.repeat_interleave(group, dim=0).reshape(small.n_heads * small.head_dim, *t.shape[1:])


def _inflate_block(block: Mapping[str, torch.Tensor], small: ModelArgs, big: ModelArgs) -> dict[str, torch.Tensor]:
    shapes = big.block_weight_shapes()
    norm_scale = math.sqrt(small.dim / big.dim)
    out: dict[str, torch.Tensor] = {}
    for name, t in block.items():
        if name.endswith("norm.weight"):
            t = t * norm_scale
        elif name.startswith(("attention.wk.", "attention.wv.")):
            t = _kv_per_query_head(t, small)
        out[name] = _corner(t, shapes[name])
    return out


def _random_block(big: ModelArgs, residual_scale: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, shape in big.block_weight_shapes().items():
        if len(shape) == 1:  # norms are ones, biases zeros
            out[name] = torch.ones(shape) if name.endswith("norm.weight") else torch.zeros(shape)
            continue
        scale = residual_scale if name.startswith(("attention.wo.", "feed_forward.w2.")) else shape[1] ** -0.5
        out[name] = torch.randn(shape, generator=gen) * scale
    return out


def inflate(
    state: Mapping[str, torch.Tensor],
    small: ModelArgs,
    dim: int,
    n_layers: int,
    ffn_dim: int,
    dtype: torch.dtype = torch.float16,
    residual_scale: float = 1e-6,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], ModelArgs]:
    """The twin's state dict (canonical names, in dtype) and its ModelArgs."""
    big = inflated_args(small, dim, n_layers, ffn_dim)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for i in range(big.n_layers):
        if i < small.n_layers:
            prefix = f"layers.{i}."
            block = {n[len(prefix) :]: t.float() for n, t in state.items() if n.startswith(prefix)}
            tensors = _inflate_block(block, small, big)
        else:
            tensors = _random_block(big, residual_scale, gen)
        out.update({f"layers.{i}.{n}": t.to(dtype) for n, t in tensors.items()})
    out["tok_embeddings.weight"] = _corner(state["tok_embeddings.weight"].float(), (big.vocab_size, dim)).to(dtype)
    out["norm.weight"] = _corner(state["norm.weight"].float() * math.sqrt(small.dim / dim), (dim,)).to(dtype)
    if not small.tie_embeddings:
        out["output.weight"] = _corner(state["output.weight"].float(), (big.vocab_size, dim)).to(dtype)
    return out, big


def inflate_dir(src: Path, out: Path, dim: int, n_layers: int, ffn_dim: int, dtype: torch.dtype) -> ModelArgs:
    """Write the twin of the checkpoint in src (any format we read) as a HF checkpoint in out, with src's tokenizer."""
    small = read_model_args(src)
    state = dict(iter_weights(src, small))
    big_state, big = inflate(state, small, dim, n_layers, ffn_dim, dtype)
    write_hf_checkpoint(big_state, big, out, max_shard_bytes=4 << 30)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return big


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, default=Path("models/pytiny"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--n_layers", type=int, default=32)
    p.add_argument("--ffn_dim", type=int, default=11008)
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    a = p.parse_args()
    big = inflate_dir(a.src, a.out, a.dim, a.n_layers, a.ffn_dim, getattr(torch, a.dtype))
    print(f"wrote {a.out}: dim {big.dim}, {big.n_layers} layers, {big.n_heads} heads of {big.head_dim}, ffn {big.ffn_dim}")


if __name__ == "__main__":
    main()
