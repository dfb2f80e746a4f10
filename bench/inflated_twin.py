"""The "inflated twin" of a small model: a checkpoint of a large shape that predicts what the small one does.

Streaming the twin costs what streaming a real model of its shape costs, while its predictions, and
so a draft's real acceptance, are the small model's. Each small tensor sits in the corner of a larger
zero one: the hidden state is the small one followed by zeros; query/key/value heads keep their index
and head_dim (so RoPE is unchanged) and the padding heads read zero keys and values; FFN units are
padded with zero rows and columns. RMSNorm divides by the root mean square over the larger width, so
its weights are scaled by sqrt(small_dim / dim) and norm_eps by small_dim / dim, which makes the
normalized state exactly the small model's. The extra blocks have random weights whose output
projections (wo, w2) are EXTRA_SCALE times smaller than usual: they leave the residual stream unchanged
to about 1e-6 of its size.

The default shape has the Llama-2-7B block: dim 4096, FFN 11008, 32 blocks, and 96 query / 32 KV heads
of head_dim 64 (pytiny's head_dim and GQA ratio 3), so q, k, v and o hold 6144 + 2048 + 2048 + 6144 =
4 x 4096 rows: 202.4 M parameters a block, 12.95 GB of fp16 blocks, like the 7B's.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace

import torch

from llama.config import ModelArgs

EXTRA_SCALE = 1e-6


def twin_args(small: ModelArgs, dim: int = 4096, n_layers: int = 32, ffn_dim: int = 11008) -> ModelArgs:
    ratio = small.n_heads // small.n_kv_heads
    n_heads = 4 * dim // (small.head_dim * (2 + 2 / ratio))  # q + k + v + o rows = 4 x dim
    n_heads -= n_heads % ratio
    return replace(
        small, dim=dim, n_layers=n_layers, ffn_dim=ffn_dim, n_heads=int(n_heads), n_kv_heads=int(n_heads) // ratio,
        head_dim=small.head_dim, norm_eps=small.norm_eps * small.dim / dim,
    )


def _pad(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    out = torch.zeros(shape, dtype=t.dtype, device=t.device)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def inflated_weights(
    small_state: dict[str, torch.Tensor], small: ModelArgs, big: ModelArgs, device: torch.device,
    dtype: torch.dtype = torch.float16, seed: int = 0,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(canonical name, tensor) of the twin, one at a time, made on `device` in `dtype`."""
    norm_scale = math.sqrt(small.dim / big.dim)
    gen = torch.Generator(device).manual_seed(seed)
    for name, shape in big.weight_shapes().items():
        layer = int(name.split(".")[1]) if name.startswith("layers.") else -1
        is_norm = name.endswith("norm.weight")
        if layer < small.n_layers:
            t = small_state[name].to(device, torch.float32)
            out = _pad(t * norm_scale if is_norm else t, shape)
        elif is_norm:
            out = torch.full(shape, norm_scale, device=device)
        else:
            out = torch.randn(shape, generator=gen, device=device) / math.sqrt(shape[1])
            if name.endswith(("wo.weight", "w2.weight")):
                out *= EXTRA_SCALE
        yield name, out.to(dtype)
