"""Fuse a loaded Llama's q/k/v projections into `attention.wqkv` and gate/up into `feed_forward.w13`.

Applied to resident models as each block is placed (the checkpoint, the exclusion flags and saved models keep
Meta's names; llama/model.py reads the fused module when it is there). Per block this leaves 4 matmuls
of 7. Layers whose formats cannot be stacked (bitsandbytes, GPTQ's permuted int4, tinygemm's layout)
stay as they are.
"""
from __future__ import annotations

from llama.model import Transformer, TransformerBlock
from offload.kernels.stacked import stack_linears


def fuse_projections(model: Transformer) -> int:
    """Fuse in place, block by block (the unfused weights are freed as each block is done); returns how
    many groups were fused (two per block when every format allows)."""
    return sum(fuse_block(block) for block in model.layers)


def fuse_block(block: TransformerBlock) -> int:
    """Fuse one TransformerBlock in place (a resident load does this as each block lands); returns how many
    groups were fused."""
    fused = 0
    attention, ffn = block.attention, block.feed_forward
    wqkv = stack_linears([attention.wq, attention.wk, attention.wv])
    if wqkv is not None:
        attention.wqkv = wqkv
        del attention.wq, attention.wk, attention.wv
        fused += 1
    w13 = stack_linears([ffn.w1, ffn.w3])
    if w13 is not None:
        ffn.w13 = w13
        del ffn.w1, ffn.w3
        fused += 1
    return fused
