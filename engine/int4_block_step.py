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
takes the step's own launches, RoPE in the epilogue and attention over each node's path included, in chunks of
up to 8 tokens.
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
    chunk = min(tokens, MAX_TOKENS) if tree_rows(cache) is not None else tokens  # an exact tree: any size
    if not (fused_ops.kernels_for(x) and int4_gemv_library(x.device) is not None
            and all(w.packed.device == x.device and w.scales.dtype == x.dtype and int4_gemv_fits(w, chunk)
                    for w in weights)):
        return None
    wqkv, wo, w13, w2 = weights
    x2 = x.reshape(tokens, dim)
    by_chunks = lambda call: _in_chunks(tokens, chunk, call)  # noqa: E731
    attention_norm = (block.attention_norm.weight, block.attention_norm.eps)
    rope = _rope_store(block, x, rotation, cache)
    if rope is not None:
        q = by_chunks(lambda s: int4_gemv(x2[s], wqkv, norm=attention_norm, rope=_rope_rows(rope, s)))
        attended = attention.attend_stored(q.view(bsz, seqlen, attention.n_heads, -1), cache, block.layer)
    else:
        heads = by_chunks(lambda s: int4_gemv(x2[s], wqkv, norm=attention_norm))
        if attention.wqkv.bias is not None:
            heads = heads + attention.wqkv.bias.to(heads.dtype)
        heads = heads.view(bsz, seqlen, -1, attention.head_dim)  # (batch, seqlen, n_heads + 2 * n_kv_heads, head_dim)
        attended = attention.attend(x, rotation, start_pos, cache, block.layer, mask, heads=heads)
    attended = attended.reshape(tokens, -1)
    h = by_chunks(lambda s: int4_gemv(attended[s], wo, residual=x2[s]))
    gated = by_chunks(lambda s: int4_gemv(h[s], w13, norm=(block.ffn_norm.weight, block.ffn_norm.eps), gated=True))
    return by_chunks(lambda s: int4_gemv(gated[s], w2, residual=h[s])).view(bsz, seqlen, dim)


def _in_chunks(tokens: int, chunk: int, call) -> torch.Tensor:
    """call(rows) for slices of `chunk` rows of the pass's `tokens`, stacked: each row gets its one-token call's bits
    (the GEMV's promise), so an exact tree of any size takes the steps' own launches."""
    if chunk >= tokens:
        return call(slice(None))
    return torch.cat([call(slice(i, i + chunk)) for i in range(0, tokens, chunk)])


def _rope_rows(rope: RopeStore, rows: slice) -> RopeStore:
    """The epilogue for some of the tokens of a one-sequence pass (the whole pass for slice(None))."""
    return rope._replace(cos=rope.cos[:, rows], sin=rope.sin[:, rows], slots=rope.slots[:, rows])


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
