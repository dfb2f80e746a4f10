"""The Llama-family transformer (Llama 1/2/3, Mistral, Qwen2) with Meta's weight names.

Plain nn.Module code: no device placement, no quantization, no offloading. Those are applied to a
built model from offload/. RoPE uses Meta's interleaved pair layout (HF checkpoints are permuted
into it when read).

Decode runs a few dozen small kernels per block, so each step is written with few of them: RMSNorm is
torch's fused rms_norm, RoPE runs in the model's dtype on q and k together when the projections are
fused, and a boolean mask becomes one additive mask per forward, not one per layer. On CUDA with Triton,
llama/fused_ops.py replaces more: the residual add with the FFN's norm, SiLU(gate) * up, and, for a
one-token step through a BatchStep (the graphed decode steps, batches), RoPE with the cache write and a
split attention; a target's exact token tree (llama/tree_rows.py) takes them too, a draft's trees keep the
torch ops (see Attention.attend). A loader may fuse
wq/wk/wv into `attention.wqkv` and w1/w3 into `feed_forward.w13` (engine/fused_projections.py); the
model reads the fused module when it is there and Meta's names otherwise.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from llama import fused_ops
from llama.config import Llama3RopeScaling, ModelArgs
from llama.kv_cache import KVCache
from llama.slot_cache import BatchStep
from llama.tree_rows import TreePass, linear_rows, tree_rows


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 for half inputs, one kernel on CUDA (was eight: cast, square, mean, ...).
        return fused_ops.rms_norm(x, self.weight, self.eps)


def rope_frequencies(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) in float32, with Llama 3.1 scaling when configured."""
    half = args.head_dim // 2
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, half, dtype=torch.float64, device="cpu") / half))
    if args.rope_scaling is not None:
        inv = _llama3_scale(inv, args.rope_scaling)
    return inv.float()


def _llama3_scale(inv: torch.Tensor, s: Llama3RopeScaling) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    mid = (1 - smooth) * inv / s.factor + smooth * inv
    out = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_mid, mid, out)


def rope_rotation(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors apply_rope multiplies by, made once per forward from cos/sin (..., seqlen, head_dim // 2):
    (cos, cos) and (-sin, sin) per pair, shape (..., seqlen, 1, head_dim // 2, 2) in `dtype` (1 broadcasts
    over the heads)."""
    cos2 = torch.stack((cos, cos), dim=-1).unsqueeze(-3)
    sin2 = torch.stack((-sin, sin), dim=-1).unsqueeze(-3)
    return cos2.to(dtype), sin2.to(dtype)


def apply_rope(x: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1) of x (batch, seqlen, heads, head_dim) to (x0 cos - x1 sin, x0 sin + x1 cos),
    in x's dtype (three kernels: no float32 copy of x); rotation from rope_rotation."""
    cos2, sin2 = rotation
    pairs = x.unflatten(-1, (-1, 2))  # (batch, seqlen, heads, head_dim // 2, 2)
    return torch.addcmul(pairs * cos2, pairs.flip(-1), sin2).flatten(-2)


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as 0 / -inf in `dtype`, made once per forward (attention would convert it per layer)."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.window = args.sliding_window
        q_dim, kv_dim = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.wq = nn.Linear(args.dim, q_dim, bias=args.qkv_bias)
        self.wk = nn.Linear(args.dim, kv_dim, bias=args.qkv_bias)
        self.wv = nn.Linear(args.dim, kv_dim, bias=args.qkv_bias)
        self.wo = nn.Linear(q_dim, args.dim, bias=False)
        self.wqkv: nn.Module | None = None  # wq, wk, wv stacked on the output dim, when a loader fused them

    def forward(
        self,
        x: torch.Tensor,
        rotation: tuple[torch.Tensor, torch.Tensor],
        start_pos: int,
        cache: KVCache | None,
        layer: int,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """mask: additive (0 / -inf), broadcastable to (batch, n_heads, seqlen, cached keys), or None."""
        attended = self.attend(x, rotation, start_pos, cache, layer, mask)
        return linear_rows(self.wo, attended, tree_rows(cache) is not None)

    def attend(
        self,
        x: torch.Tensor,
        rotation: tuple[torch.Tensor, torch.Tensor],
        start_pos: int,
        cache: KVCache | None,
        layer: int,
        mask: torch.Tensor | None = None,
        heads: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attention's output before wo, (batch, seqlen, n_heads * head_dim). heads: wqkv(x) when the caller
        made it, (batch, seqlen, n_heads + 2 * n_kv_heads, head_dim); x is then read for its shape only."""
        bsz, seqlen, _ = x.shape
        rows = tree_rows(cache)  # an exact tree pass (llama/tree_rows.py), or None
        if heads is None and self.wqkv is not None:
            heads = linear_rows(self.wqkv, x, rows is not None).view(bsz, seqlen, self.n_heads + 2 * self.n_kv_heads,
                                                                       self.head_dim)
        # One query a sequence, or an exact tree. With the kernels on the draft's token trees and chains, resident
        # speculation measured 0.3-0.7x plain decoding on the H200 (the draft's share of a round grew from ~3 to ~50
        # ms; each tree size and bucket is another kernel variant to compile mid-reply, the likely cause).
        if heads is not None and self.fused_step_applies(x, cache):
            return self._fused_step(heads, rotation, cache, layer)
        q, k, v = self._rotated_qkv(x, rotation, heads, rows is not None)
        # q: (batch, n_heads, seqlen, head_dim); k, v: (batch, n_kv_heads, seqlen, head_dim)
        if cache is not None:
            k, v = cache.update(layer, start_pos, k, v)  # (batch, n_kv_heads, start_pos + seqlen, head_dim)
        if rows is not None or (isinstance(cache, BatchStep) and seqlen == 1 and fused_ops.kernels_for(q)):
            return self._by_position(q.transpose(1, 2), k, v, cache)  # as attend_stored
        gqa = self.n_heads != self.n_kv_heads
        windowed = self.window is not None and k.shape[2] > self.window
        if seqlen == 1 and (mask is None or gqa):
            out = self._decode_attention(q, k, v, mask)
        elif mask is not None:  # a token tree or a batch: the caller says which cached keys each query sees
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        elif k.shape[2] == seqlen and not windowed:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            # After earlier tokens, or with a window: query i sees keys (start_pos + i - window, start_pos + i].
            key_pos = torch.arange(k.shape[2], device=x.device)
            query_pos = torch.arange(start_pos, start_pos + seqlen, device=x.device)
            visible = key_pos[None, :] <= query_pos[:, None]  # (seqlen, start_pos + seqlen)
            if windowed:
                visible &= key_pos[None, :] > query_pos[:, None] - self.window
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=gqa)
        return out.transpose(1, 2).reshape(bsz, seqlen, -1)  # (batch, seqlen, n_heads * head_dim)

    @staticmethod
    def fused_step_applies(x: torch.Tensor, cache: KVCache | BatchStep | None) -> bool:
        """Whether a pass of x (batch, seqlen, dim) takes the fused step: RoPE with the cache write, then attend_stored
        (one token a sequence through a BatchStep, or an exact tree's)."""
        return (isinstance(cache, BatchStep) and (x.shape[1] == 1 or cache.tree_rows is not None)
                and fused_ops.kernels_for(x) is not None)

    def _fused_step(
        self, heads: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor], cache: BatchStep, layer: int
    ) -> torch.Tensor:
        """A step's attention in two launches after the projection (heads): RoPE with the cache write, and
        the split attention over the step's kv_len keys."""
        q = fused_ops.rope_store(heads, self.n_heads, rotation, *cache.layer(layer))  # (batch, seqlen, heads, dim)
        return self.attend_stored(q, cache, layer)

    def attend_stored(self, q: torch.Tensor, cache: BatchStep, layer: int) -> torch.Tensor:
        """The split attention of rotated q (batch, seqlen, n_heads, head_dim) over the step's kv_len keys, this
        step's already stored -> (batch, seqlen, n_heads * head_dim). Each query sees the positions up to its own
        (the step's slots; an exact tree's positions and paths) within the window."""
        return self._by_position(q, *cache.stored(layer), cache)

    def _by_position(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: BatchStep | TreePass
    ) -> torch.Tensor:
        """The split attention of q (batch, seqlen, n_heads, head_dim) over k, v (batch, n_kv_heads, kv_len,
        head_dim), each query seeing the positions up to its own within the window: an exact tree's nodes
        through their paths, a BatchStep step's queries at its slots -> (batch, seqlen, n_heads * head_dim)."""
        rows = tree_rows(cache)
        if rows is None:
            return fused_ops.attention(q, k, v, None, cache.positions, None, self.window)
        return fused_ops.attention(q, k, v, None, rows.positions, rows.paths, self.window)

    def _rotated_qkv(
        self, x: torch.Tensor, rotation: tuple[torch.Tensor, torch.Tensor], heads: torch.Tensor | None, exact: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (RoPE applied) and v, each (batch, heads, seqlen, head_dim); heads: the fused projection's; exact:
        the projections row by row (llama/tree_rows.py)."""
        bsz, seqlen, _ = x.shape
        if heads is not None:  # one matmul, and RoPE over q's and k's heads at once
            qk = apply_rope(heads[:, :, : self.n_heads + self.n_kv_heads], rotation)
            q, k = qk.split((self.n_heads, self.n_kv_heads), dim=2)
            v = heads[:, :, self.n_heads + self.n_kv_heads :]
        else:
            q = apply_rope(linear_rows(self.wq, x, exact).view(bsz, seqlen, self.n_heads, self.head_dim), rotation)
            k = apply_rope(linear_rows(self.wk, x, exact).view(bsz, seqlen, self.n_kv_heads, self.head_dim), rotation)
            v = linear_rows(self.wv, x, exact).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _decode_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """One query per sequence: two small matmuls, with no backend dispatch, copies of K/V, or host syncs
        (on CUDA the split attention kernel)."""
        if fused_ops.kernels_for(q):  # the window is the kernel's (as in a graphed step) unless the mask has it
            m = None if mask is None else mask.reshape(mask.shape[0], 1, -1)  # (batch or 1, 1, positions)
            out = fused_ops.attention(q.transpose(1, 2), k, v, m, window=self.window if mask is None else None)
            return out.view(q.shape[0], 1, self.n_heads, self.head_dim).transpose(1, 2)  # (batch, n_heads, 1, dim)
        if mask is None and self.window is not None and k.shape[2] > self.window:
            k, v = k[:, :, -self.window :], v[:, :, -self.window :]
        bsz, n_rep = q.shape[0], self.n_heads // self.n_kv_heads
        # Query heads j*n_rep .. (j+1)*n_rep-1 share kv head j.
        qg = q.reshape(bsz, self.n_kv_heads, n_rep, self.head_dim)
        scores = (qg @ k.transpose(-1, -2)) * self.head_dim**-0.5  # (batch, n_kv_heads, n_rep, positions)
        if mask is not None:
            scores = scores + mask.reshape(mask.shape[0], 1, 1, -1)  # (batch or 1, 1, 1, positions)
        probs = scores.softmax(-1, dtype=torch.float32).to(v.dtype)
        out = probs @ v  # (batch, n_kv_heads, n_rep, head_dim)
        return out.reshape(bsz, self.n_heads, 1, self.head_dim)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w13: nn.Module | None = None  # w1 and w3 stacked on the output dim, when a loader fused them

    def forward(self, x: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """exact: the matmuls row by row (llama/tree_rows.py)."""
        if self.w13 is not None:
            gate, up = linear_rows(self.w13, x, exact).chunk(2, dim=-1)
        else:
            gate, up = linear_rows(self.w1, x, exact), linear_rows(self.w3, x, exact)
        return linear_rows(self.w2, fused_ops.silu_mul(gate, up), exact)


class TransformerBlock(nn.Module):
    # A faster route for the whole block that the engine may install for the formats it knows (int4 on CUDA:
    # engine/int4_block_step.py): called with (block, x, rotation, start_pos, cache, mask), it returns
    # the block's output, or None where it does not apply to this pass (then the code below runs).
    fast_path = None

    def __init__(self, layer: int, args: ModelArgs) -> None:
        super().__init__()
        self.layer = layer
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rotation: tuple[torch.Tensor, torch.Tensor],
        start_pos: int,
        cache: KVCache | None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.fast_path is not None:
            out = self.fast_path(self, x, rotation, start_pos, cache, mask)
            if out is not None:
                return out
        attended = self.attention(self.attention_norm(x), rotation, start_pos, cache, self.layer, mask)
        h, normed = fused_ops.add_rms_norm(x, attended, self.ffn_norm.weight, self.ffn_norm.eps)  # one pass
        return h + self.feed_forward(normed, tree_rows(cache) is not None)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.set_max_seq_len(args.max_seq_len)

    def set_max_seq_len(self, n: int) -> None:
        """(Re)build the RoPE tables (n, head_dim // 2) for positions 0..n-1; always real (not meta) tensors."""
        device = self.rope_cos.device if hasattr(self, "rope_cos") else torch.device("cpu")
        angles = torch.outer(torch.arange(n, dtype=torch.float32, device="cpu"), rope_frequencies(self.args))
        self.register_buffer("rope_cos", angles.cos().to(device), persistent=False)
        self.register_buffer("rope_sin", angles.sin().to(device), persistent=False)

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int = 0,
        cache: KVCache | None = None,
        last_only: bool = False,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (batch, seqlen) -> logits (batch, seqlen or 1, vocab) in the model's dtype.

        The keys and values of `tokens` go to cache slots start_pos .. start_pos + seqlen - 1. A token
        tree also gives each token's RoPE position, `positions` (seqlen,), and which slots each token
        attends to, `mask` (seqlen, start_pos + seqlen) bool (see llama/speculative/tree.py). A batch of
        sequences, each at its own position, gives `positions` (batch, seqlen) and `mask`
        (batch, seqlen, cached keys), and a cache that writes each row where its positions say
        (llama/slot_cache.py); start_pos is then unused.
        """
        h = self._through_blocks(tokens, start_pos, cache, positions, mask)
        return self.logits(h[:, -1:] if last_only else h, tree_rows(cache) is not None)

    def logits(self, h: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """The head over hidden states (batch, seqlen, dim) after the last block, on the head's device; exact: row
        by row (llama/tree_rows.py)."""
        return linear_rows(self.output, self.norm(h).to(self.output.weight.device), exact)

    def fill_cache(self, tokens: torch.Tensor, start_pos: int, cache: KVCache, blocks: int | None = None) -> None:
        """Run tokens (batch, seqlen) through the blocks only, for their keys and values in the cache: a prompt
        chunk before the last one needs no logits (no norm, no head, nothing copied back). blocks: only the
        first this many (a warm-up)."""
        self._through_blocks(tokens, start_pos, cache, None, None, blocks)

    def _through_blocks(
        self,
        tokens: torch.Tensor,
        start_pos: int,
        cache: KVCache | None,
        positions: torch.Tensor | None,
        mask: torch.Tensor | None,
        blocks: int | None = None,
    ) -> torch.Tensor:
        """The hidden states (batch, seqlen, dim) after the last block (forward's arguments; fill_cache's blocks)."""
        seqlen = tokens.shape[1]
        if (positions is None or positions.dim() == 1) and start_pos + seqlen > self.rope_cos.shape[0]:
            raise ValueError(f"position {start_pos + seqlen} beyond max_seq_len {self.rope_cos.shape[0]}")
        h = self.tok_embeddings(tokens)  # (batch, seqlen, dim)
        if positions is None:
            cos, sin = self.rope_cos[start_pos : start_pos + seqlen], self.rope_sin[start_pos : start_pos + seqlen]
        else:
            positions = positions.to(self.rope_cos.device)
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (seqlen or batch, seqlen, head_dim // 2)
            mask = additive_mask(mask.to(h.device), h.dtype)
            if positions.dim() == 2:  # one row per sequence: broadcast over the heads
                mask = mask.unsqueeze(1)  # (batch, 1, seqlen, cached keys)
        rotation = rope_rotation(cos.to(h.device), sin.to(h.device), h.dtype)
        for block in self.layers if blocks is None else self.layers[:blocks]:
            h = block(h, rotation, start_pos, cache, mask)
        return h
