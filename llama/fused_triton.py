"""Triton kernels for the decode step's small operations, each doing in one launch what torch does in several.

A graphed 7B decode step launched ~600 kernels; outside the matmuls each is a few microseconds of a step
whose weights the H200 reads in ~3 ms, so their count is what separates the step from memory speed. Here:
the residual add and RMSNorm in one pass, SiLU(gate) * up, RoPE of q and k together with the write of k
and v into the cache, and attention of a few queries over the cache split over positions (flash-decoding:
each split's softmax pieces, combined by the last split of a query head to finish, or by a second launch).

Import only through `kernels()`: it imports Triton lazily, so that machines without Triton (the CPU CI)
never do; llama/fused_ops.py holds the torch references and chooses between the two.
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

LOG2E = 1.4426950408889634


@functools.cache
def kernels() -> SimpleNamespace | None:
    """The compiled kernels, or None where Triton cannot be imported."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def add_rms_norm(x, delta, weight, sum_out, norm_out, dim, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        # One program per row: the row (dim <= BLOCK) stays in registers between the sum and the norm.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        inside = cols < dim
        h = tl.load(x + row * dim + cols, mask=inside, other=0.0).to(tl.float32)
        if HAS_DELTA:
            h += tl.load(delta + row * dim + cols, mask=inside, other=0.0).to(tl.float32)
            h = h.to(sum_out.dtype.element_ty)  # the sum is rounded as the residual stream keeps it
            tl.store(sum_out + row * dim + cols, h, mask=inside)
            h = h.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(h * h, axis=0) / dim + eps)
        w = tl.load(weight + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(norm_out + row * dim + cols, (h * rstd * w).to(norm_out.dtype.element_ty), mask=inside)

    @triton.jit
    def silu_mul(gate, up, out, width, gate_row, up_row, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < width
        g = tl.load(gate + row * gate_row + cols, mask=inside, other=0.0).to(tl.float32)
        u = tl.load(up + row * up_row + cols, mask=inside, other=0.0).to(tl.float32)
        act = (g * tl.sigmoid(g)).to(out.dtype.element_ty).to(tl.float32)  # rounded where torch's silu rounds
        tl.store(out + row * width + cols, (act * u).to(out.dtype.element_ty), mask=inside)

    @triton.jit
    def rope_store(heads, cos, sin, slots, q_out, keys, values,
                   seqlen, n_heads, n_kv_heads,
                   h_b, h_t, c_b, c_t, c_i, s_b, s_t, kv_b, kv_h, kv_p,
                   HALF: tl.constexpr):
        # Program (token, head) over q's and k's heads: rotate the interleaved pairs; k's programs also store
        # k and its v head into the cache at the token's slot. heads: (batch, seqlen, n_heads + 2 kv, head_dim).
        bt = tl.program_id(0)
        head = tl.program_id(1)
        b = bt // seqlen
        t = bt % seqlen
        i = tl.arange(0, HALF)
        src = heads + b * h_b + t * h_t + head * (2 * HALF)
        x0 = tl.load(src + 2 * i).to(tl.float32)
        x1 = tl.load(src + 2 * i + 1).to(tl.float32)
        c = tl.load(cos + b * c_b + t * c_t + i * c_i).to(tl.float32)
        s = tl.load(sin + b * c_b + t * c_t + i * c_i).to(tl.float32)
        r0 = x0 * c - x1 * s
        r1 = x1 * c + x0 * s
        if head < n_heads:
            dst = q_out + (bt * n_heads + head) * (2 * HALF)
            tl.store(dst + 2 * i, r0.to(q_out.dtype.element_ty))
            tl.store(dst + 2 * i + 1, r1.to(q_out.dtype.element_ty))
        else:
            kh = head - n_heads
            slot = tl.load(slots + b * s_b + t * s_t)
            at = b.to(tl.int64) * kv_b + kh * kv_h + slot * kv_p
            tl.store(keys + at + 2 * i, r0.to(keys.dtype.element_ty))
            tl.store(keys + at + 2 * i + 1, r1.to(keys.dtype.element_ty))
            j = tl.arange(0, 2 * HALF)
            v = tl.load(heads + b * h_b + t * h_t + (head + n_kv_heads) * (2 * HALF) + j)
            tl.store(values + at + j, v.to(values.dtype.element_ty))

    @triton.jit
    def combine(part_acc, part_max, part_sum, out, bth, n_splits, HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
        # Query head bth's output from its splits' softmax pieces (.cg: read past L1, where another SM's
        # writes of this launch could be stale).
        sp = tl.arange(0, SPLITS)
        used = sp < n_splits
        best = tl.load(part_max + bth * n_splits + sp, mask=used, other=float("-inf"), cache_modifier=".cg")
        top = tl.max(best, axis=0)
        w = tl.where(best == float("-inf"), 0.0, tl.exp2(best - top))
        sums = tl.load(part_sum + bth * n_splits + sp, mask=used, other=0.0, cache_modifier=".cg")
        total = tl.sum(w * sums, axis=0)
        d = tl.arange(0, HEAD_DIM)
        acc = tl.load(part_acc + (bth * n_splits + sp)[:, None] * HEAD_DIM + d[None, :], mask=used[:, None], other=0.0,
                      cache_modifier=".cg")
        o = tl.sum(w[:, None] * acc, axis=0) / total
        tl.store(out + bth * HEAD_DIM + d, o.to(out.dtype.element_ty))

    # Arguments that change from pass to pass are not specialized on (Triton compiles a variant for each value that
    # is 1 or a multiple of 16): a token tree's size, depth and cache length would each compile another mid-reply.
    @triton.jit(do_not_specialize=["seqlen", "kv_len", "depth", "q_b", "m_b", "p_b", "a_b", "a_t"])
    def attention_split(q, keys, values, mask, positions, paths, part_acc, part_max, part_sum, out, arrivals,
                        seqlen, n_heads, rep, kv_len, split_cap, window, depth, scale,
                        q_b, q_t, q_h, k_b, k_h, k_p, v_b, v_h, v_p, m_b, m_t, p_b, p_t, a_b, a_t,
                        HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
                        HAS_POSITIONS: tl.constexpr, HAS_PATHS: tl.constexpr, WINDOWED: tl.constexpr,
                        COMBINE: tl.constexpr, SPLITS: tl.constexpr):
        # Program (query head, split): an online softmax over the query's visible positions [lo, hi) (hi: its
        # position + 1 with HAS_POSITIONS, else kv_len; lo: hi - window with WINDOWED, else 0), cut into at most
        # split_cap splits of whole tiles. The cut depends on lo and hi only, so a query gets the same bits
        # whatever else the launch holds: a token tree's node the bits of the one-token step at its position.
        # HAS_PATHS: the last `depth` positions up to hi are read at paths[b, t, hi - 1 - n] where that is >= 0
        # (a tree node's ancestors, at their own slots), the rest at slot n. Splits past the query's own count
        # store empty pieces. The lengths are runtime values, so every tree size, cache bucket and position
        # shares one compiled kernel. Exponentials in base 2: scores are scaled by log2(e) once. COMBINE: the
        # query head's last split to finish (counted in arrivals, zeros left as found) also combines them.
        bth = tl.program_id(0)
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        h = bth % n_heads
        b = bth // n_heads // seqlen
        t = bth // n_heads % seqlen
        if HAS_POSITIONS:
            hi = tl.load(positions + b * p_b + t * p_t).to(tl.int32) + 1
        else:
            hi = kv_len
        if WINDOWED:
            lo = tl.maximum(hi - window, 0)
        else:
            lo = 0
        tiles = tl.cdiv(hi - lo, BLOCK_N)
        per_split = tl.cdiv(tiles, tl.maximum(tl.minimum(tiles, split_cap), 1)) * BLOCK_N
        span = tl.where(split < tl.cdiv(hi - lo, per_split), per_split, 0)
        d = tl.arange(0, HEAD_DIM)
        qv = tl.load(q + b * q_b + t * q_t + h * q_h + d).to(tl.float32) * (scale * 1.4426950408889634)
        k_base = keys + b.to(tl.int64) * k_b + (h // rep) * k_h
        v_base = values + b.to(tl.int64) * v_b + (h // rep) * v_h
        best = tl.full((), float("-inf"), tl.float32)
        total = tl.zeros((), tl.float32)
        acc = tl.zeros((HEAD_DIM,), tl.float32)
        for first in range(0, span, BLOCK_N):  # a multiple of BLOCK_N
            n = lo + split * per_split + first + tl.arange(0, BLOCK_N)
            inside = n < hi
            at = n
            if HAS_PATHS:
                back = hi - 1 - n
                slot = tl.load(paths + b * a_b + t * a_t + back, mask=inside & (back < depth), other=-1)
                at = tl.where(slot >= 0, slot, n)
            k = tl.load(k_base + at[:, None] * k_p + d[None, :], mask=inside[:, None], other=0.0).to(tl.float32)
            v = tl.load(v_base + at[:, None] * v_p + d[None, :], mask=inside[:, None], other=0.0)  # in flight with k
            s = tl.sum(k * qv[None, :], axis=1)
            if HAS_MASK:
                s += tl.load(mask + b * m_b + t * m_t + n, mask=inside, other=0.0).to(tl.float32) * 1.4426950408889634
            s = tl.where(inside, s, float("-inf"))
            new_best = tl.maximum(best, tl.max(s, axis=0))
            safe = tl.where(new_best == float("-inf"), 0.0, new_best)  # nothing visible yet: keep zeros
            p = tl.exp2(s - safe)
            keep = tl.exp2(best - safe)
            acc = acc * keep + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            total = total * keep + tl.sum(p, axis=0)
            best = new_best
        at = bth * n_splits + split
        tl.store(part_acc + at * HEAD_DIM + d, acc)
        tl.store(part_max + at, best)
        tl.store(part_sum + at, total)
        if COMBINE:
            tl.debug_barrier()  # every thread's pieces are written before the arrival is counted
            if tl.atomic_add(arrivals + bth, 1, sem="acq_rel", scope="gpu") == n_splits - 1:
                combine(part_acc, part_max, part_sum, out, bth, n_splits, HEAD_DIM, SPLITS)
                tl.atomic_xchg(arrivals + bth, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def attention_combine(part_acc, part_max, part_sum, out, n_splits,
                          HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
        combine(part_acc, part_max, part_sum, out, tl.program_id(0), n_splits, HEAD_DIM, SPLITS)

    return SimpleNamespace(add_rms_norm=add_rms_norm, silu_mul=silu_mul, rope_store=rope_store,
                           attention_split=attention_split, attention_combine=attention_combine,
                           next_power_of_2=triton.next_power_of_2)
