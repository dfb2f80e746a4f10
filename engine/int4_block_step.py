"""A Llama block's pass of up to 8 tokens in four int4 GEMV launches besides attention (CUDA).

Installed as TransformerBlock.fast_path on the blocks of resident runs (engine/llama_offload.py). It applies where the
block's projections are fused (wqkv, w13) plain Int4Weights that our kernel takes (int4_gemv_cuda.py) and the
model's own fused kernels run (llama/fused_ops.py); the block's norms, SiLU(gate) * up and residual adds then
ride in the matmuls' launches:

    q     = wqkv(RMSNorm(x))             the attention norm applied as x is staged; a step's RoPE of q and k,
                                         and the cache write of k and v, in the epilogue
    h     = x + wo(attention(q))         attention as the model runs it
    gated = SiLU(w1(RMSNorm(h))) * w3(RMSNorm(h))   one launch over the stacked w13
    out   = h + w2(gated)

Eleven launches a block become five in a one-token step (a BatchStep's; attention is one launch). Each token's
matmuls are the same in a pass of several tokens as in a one-token step; an exact token tree (llama/tree_rows.py)
takes the step's own launches, RoPE in the epilogue and attention over each node's path included (the GEMV
sums each chunk of 8 tokens as a call of its own, all chunks in one launch).
"""
from __future__ import annotations

import torch

from llama import fused_ops
from offload.kernels.int4_format import Int4Weight
from llama.tree_rows import tree_rows
from offload.kernels.int4_gemv_cuda import MAX_TOKENS, RopeStore, int4_gemv, int4_gemv_fits, int4_gemv_library
from offload.kernels.linear import Int4Linear


def int4_block_step(block, x: torch.Tensor, rotation, start_pos: int, cache, mask) -> torch.Tensor | None:
    """The block's output for x (batch, seqlen, dim), or None where this route does not apply."""
    attention, ffn = block.attention, block.feed_forward
    bsz, seqlen, dim = x.shape
    weights = _int4_weights(attention.wqkv, attention.wo, ffn.w13, ffn.w2)
    if weights is None or attention.wo.bias is not None or ffn.w13.bias is not None or ffn.w2.bias is not None:
        return None
    tokens = bsz * seqlen
    if not (fused_ops.kernels_for(x) and int4_gemv_library(x.device) is not None
            and (tokens <= MAX_TOKENS or tree_rows(cache) is not None)  # an exact tree: any size, 8 rows a chunk
            and all(w.packed.device == x.device and w.scales.dtype == x.dtype and int4_gemv_fits(w, tokens)
                    for w in weights)):
        return None
    wqkv, wo, w13, w2 = weights
    x2 = x.reshape(tokens, dim)
    attention_norm = (block.attention_norm.weight, block.attention_norm.eps)
    rope = _rope_store(block, x, rotation, cache)
    if rope is not None:
        q = int4_gemv(x2, wqkv, norm=attention_norm, rope=rope).view(bsz, seqlen, attention.n_heads, -1)
        attended = attention.attend_stored(q, cache, block.layer)
    else:
        heads = int4_gemv(x2, wqkv, norm=attention_norm)
        if attention.wqkv.bias is not None:
            heads = heads + attention.wqkv.bias.to(heads.dtype)
        heads = heads.view(bsz, seqlen, -1, attention.head_dim)  # (batch, seqlen, n_heads + 2 * n_kv_heads, head_dim)
        attended = attention.attend(x, rotation, start_pos, cache, block.layer, mask, heads=heads)
    h = int4_gemv(attended.reshape(tokens, -1), wo, residual=x2)
    gated = int4_gemv(h, w13, norm=(block.ffn_norm.weight, block.ffn_norm.eps), gated=True)
    return int4_gemv(gated, w2, residual=h).view(bsz, seqlen, dim)


def _rope_store(block, x: torch.Tensor, rotation, cache) -> RopeStore | None:
    """wqkv's epilogue for a step that the model would run through its fused step (RoPE with the cache write), or
    None (a tree, a bias to add first, a cache in another dtype)."""
    attention = block.attention
    if attention.wqkv.bias is not None or not attention.fused_step_applies(x, cache):
        return None
    keys, values, slots = cache.layer(block.layer)
    if keys.dtype != x.dtype or keys.device != x.device:
        return None
    bsz, seqlen, _ = x.shape
    cos, sin = fused_ops.rope_factors(rotation, bsz, seqlen, attention.head_dim)
    return RopeStore(attention.n_heads, attention.n_kv_heads, attention.head_dim, cos, sin, slots, keys, values)


def _int4_weights(*linears) -> list[Int4Weight] | None:
    """Each linear's plain int4 weight as bound now, or None if any is missing or in another format."""
    if any(not isinstance(m, Int4Linear) for m in linears):
        return None
    weights = [m.weight_format() for m in linears]
    return weights if all(type(w) is Int4Weight for w in weights) else None
