"""One decode step of a pre-norm attention + SwiGLU block as one compiled CPU call, with its pure-torch twin.

The unfused block spends most of a small model's decode step in Python-level operator calls (some sixty per
block: norms, three projections, RoPE's float round trips, cache writes, attention, SiLU); the compiled
`decode_block` does the whole step in one call, the q/k/v rows as one parallel pass over their weights and
w1/w3 as another, everything between them in float32. `decode_block_reference` computes the same thing with
torch operators: the twin tests hold the kernel against, and the path taken when the kernels cannot build.

A linear layer is passed as the list of its format's tensors, then its bias if it has one:
[weight] (float32, bfloat16 or float16), [qweight, scale] (Int8Weight, one scale per row) or
[packed, scales, zeros] (Int4Weight). `cpu_weight_tensors` gives that list for a module, or None when the
module is something the kernel does not take.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from offload.kernels.cpu_ext import cpu_extension
from offload.kernels.few_token_linear import FewTokenLinear
from offload.kernels.int4_format import Int4Weight
from offload.kernels.int8_format import FLOAT_DTYPES, Int8Weight
from offload.kernels.linear import Int4Linear, Int8Linear

LinearTensors = list[torch.Tensor]


def cpu_weight_tensors(module: nn.Module) -> LinearTensors | None:
    """The tensor list of a plain nn.Linear (or FewTokenLinear), Int8Linear (one scale per row) or Int4Linear
    whose tensors are contiguous on the CPU; None for anything else (bitsandbytes, GPTQ act-order, grouped int8,
    CUDA)."""
    if type(module) in (nn.Linear, FewTokenLinear) and module.weight.dtype in FLOAT_DTYPES:
        tensors = [module.weight]
    elif type(module) in (Int8Linear, Int4Linear) and module.format_type in (Int8Weight, Int4Weight):
        tensors = [getattr(module, name) for name in module.format_names]
        if module.format_type is Int8Weight and tensors[1].dim() != 1:
            return None
    else:
        return None
    if module.bias is not None:
        tensors.append(module.bias)
    if not all(t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return None
    return tensors


def cpu_linear(x: torch.Tensor, weight: LinearTensors) -> torch.Tensor:
    """x [tokens, in] through one linear given as its tensor list -> [tokens, out] in x's dtype."""
    ext = cpu_extension()
    return ext.linear(x, weight) if ext is not None else linear_reference(x.float(), weight).to(x.dtype)


def linear_reference(x: torch.Tensor, weight: LinearTensors) -> torch.Tensor:
    """x float32 [tokens, in] @ the dequantized weight.T (+ bias), in float32."""
    first = weight[0]
    if first.dtype == torch.int8:
        w, rest = Int8Weight(*weight[:2]).dequantize(), weight[2:]
    elif first.dtype == torch.uint8:
        w, rest = Int4Weight(*weight[:3]).dequantize(), weight[3:]
    else:
        w, rest = first.float(), weight[1:]
    return F.linear(x, w, rest[0].float() if rest else None)


INT8_BLOCK = 32  # activation values per int8 scale on the avx512_vnni path


def int8_rounded_activations(x: torch.Tensor) -> torch.Tensor:
    """x float32 [tokens, in] as an int4 linear of up to 8 tokens on the avx512_vnni path reads it, each token
    on its own: each
    block of INT8_BLOCK values rounded to int8 steps of max|block| / 127 (the kernel, fed this, computes float
    math)."""
    blocks = x.float().unflatten(-1, (-1, INT8_BLOCK))  # (tokens, in / INT8_BLOCK, INT8_BLOCK)
    step = blocks.abs().amax(-1, keepdim=True) / 127
    return (torch.round(blocks / step.clamp(min=torch.finfo(torch.float32).tiny)) * step).flatten(-2)


def decode_block(
    x: torch.Tensor,
    attn_norm: torch.Tensor,
    ffn_norm: torch.Tensor,
    eps: float,
    weights: list[LinearTensors],
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    n_heads: int,
    window: int = 0,
) -> torch.Tensor:
    """x [batch, dim] (one new token per sequence, at position pos) through the block; returns [batch, dim]
    in x's dtype and writes the token's keys and values to k_cache, v_cache [batch, kv_heads, positions,
    head_dim] at pos. weights: wq, wk, wv, wo, w1, w3, w2 as tensor lists; cos, sin: float32 [head_dim // 2]
    at pos; window: attend to the last `window` positions only (0: all)."""
    ext = cpu_extension()
    if ext is None:
        return decode_block_reference(x, attn_norm, ffn_norm, eps, weights, k_cache, v_cache, pos, cos, sin,
                                      n_heads, window)
    return ext.decode_block(x, attn_norm, ffn_norm, eps, *weights, k_cache, v_cache, pos, cos, sin, n_heads, window)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    pairs = x.unflatten(-1, (-1, 2))  # (batch, heads, head_dim // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def decode_block_reference(
    x: torch.Tensor,
    attn_norm: torch.Tensor,
    ffn_norm: torch.Tensor,
    eps: float,
    weights: list[LinearTensors],
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pos: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    n_heads: int,
    window: int = 0,
) -> torch.Tensor:
    """decode_block in torch operators, float32 between the same two roundings to x's dtype (the residuals)."""
    wq, wk, wv, wo, w1, w3, w2 = weights
    bsz, n_kv, head_dim = x.shape[0], k_cache.shape[1], k_cache.shape[3]
    normed = _rms_norm(x.float(), attn_norm, eps)
    q = _rope(linear_reference(normed, wq).view(bsz, n_heads, head_dim), cos, sin)
    k = _rope(linear_reference(normed, wk).view(bsz, n_kv, head_dim), cos, sin)
    k_cache[:, :, pos] = k.to(k_cache.dtype)
    v_cache[:, :, pos] = linear_reference(normed, wv).view(bsz, n_kv, head_dim).to(v_cache.dtype)
    lo = max(0, pos + 1 - window) if window > 0 else 0
    keys, values = k_cache[:, :, lo : pos + 1].float(), v_cache[:, :, lo : pos + 1].float()
    # Query heads j*rep .. (j+1)*rep-1 share kv head j.
    qg = q.view(bsz, n_kv, n_heads // n_kv, head_dim)
    probs = (qg @ keys.transpose(-1, -2) * head_dim**-0.5).softmax(-1)  # (batch, n_kv, rep, positions)
    attended = (probs @ values).reshape(bsz, n_heads * head_dim)
    h = x + linear_reference(attended, wo).to(x.dtype)
    normed = _rms_norm(h.float(), ffn_norm, eps)
    act = F.silu(linear_reference(normed, w1)) * linear_reference(normed, w3)
    return h + linear_reference(act, w2).to(x.dtype)
