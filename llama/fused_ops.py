"""The decode step's fused operations: a Triton kernel (llama/fused_triton.py) on CUDA, its torch reference
beside it everywhere else.

Each public function computes what its `*_reference` twin computes; the kernel runs when the inputs are on
CUDA, Triton imports, and the shapes are ones it takes (else the reference, with no error), so the CPU, a
machine without Triton, and torch.compile's tracing all take the references. The kernels compute in float32
and round once, where the references round after each torch op: results agree to rounding, not bit for bit,
so a path either always or never takes a kernel (graphs on and off run the same code).

Measured on the H200 (bench/decode_bench.py): see llama/decode_graphs.py's docstring.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from llama.fused_triton import kernels

MAX_NORM_DIM = 16384  # one program holds a row in registers
# The split attention's settings, fastest in one launch on the H200 at 256, 1024 and 4096 positions
# (bench/attention_bench.py: 6.1, 9.8, 22.2 us a layer, against 7.1, 10.9, 24.2 for tiles of 32 positions, 2 warps
# and a second launch to combine).
ATTENTION_BLOCK = 16  # cache positions per tile
ATTENTION_PROGRAMS = 1024  # splits are chosen so that a step launches about this many programs
ATTENTION_WARPS = 1
MAX_SPLITS = 64  # a power of 2: the combine kernel's fixed width
MAX_ATTENTION_QUERIES = 32  # queries per sequence; a prefill-sized chunk reads the cache once per query here
MAX_TREE_QUERIES = 256  # a token tree's nodes, each seeing its own path (paths): its pass's one attention
MAX_ONE_LAUNCH_QUERIES = 8192  # query heads a one-launch attention counts its splits' arrivals for (32 KiB)
_ARRIVALS: dict[tuple[int | None, int], torch.Tensor] = {}  # (device index, stream) -> counters, see _arrivals


_references_only = False  # set by references_only(): a benchmark's "before" in the same process


@contextmanager
def references_only() -> Iterator[None]:
    """Run the torch references everywhere inside (steps captured inside keep them): the unfused step."""
    global _references_only
    previous, _references_only = _references_only, True
    try:
        yield
    finally:
        _references_only = previous


def kernels_for(*tensors: torch.Tensor):
    """The kernels when every tensor is on CUDA in a float dtype the kernels take and nothing is traced."""
    if _references_only or torch.compiler.is_compiling():
        return None
    if not all(t.is_cuda and t.dtype in (torch.float16, torch.bfloat16, torch.float32) for t in tensors):
        return None
    return kernels()


def _is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# --- residual add + RMSNorm -------------------------------------------------------------------------------

def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


def add_rms_norm_reference(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + delta
    return h, rms_norm_reference(h, weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (statistics in float32), as F.rms_norm."""
    kern = kernels_for(x, weight)
    if kern is None or not _norm_fits(x, weight):
        return rms_norm_reference(x, weight, eps)
    out = torch.empty_like(x)
    _launch_norm(kern, x, None, weight, None, out, eps)
    return out


def add_rms_norm(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, RMSNorm(x + delta)): the residual stream and the next sublayer's input, one pass."""
    kern = kernels_for(x, delta, weight)
    if kern is None or not _norm_fits(x, weight) or delta.shape != x.shape or not delta.is_contiguous():
        return add_rms_norm_reference(x, delta, weight, eps)
    h, out = torch.empty_like(x), torch.empty_like(x)
    _launch_norm(kern, x, delta, weight, h, out, eps)
    return h, out


def _norm_fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.is_contiguous() and weight.is_contiguous() and weight.dtype == x.dtype and weight.dim() == 1
            and x.shape[-1] == weight.shape[0] <= MAX_NORM_DIM and x.numel() > 0)


def _launch_norm(kern, x, delta, weight, h, out, eps: float) -> None:
    dim = x.shape[-1]
    block = kern.next_power_of_2(dim)
    kern.add_rms_norm[(x.numel() // dim,)](x, x if delta is None else delta, weight, out if h is None else h, out,
                                         dim, eps, HAS_DELTA=delta is not None, BLOCK=block,
                                         num_warps=min(16, max(1, block // 256)))


# --- SiLU(gate) * up ----------------------------------------------------------------------------------------

def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gate, up (..., width) whose last dim is contiguous (halves of one fused matmul)."""
    kern = kernels_for(gate, up)
    width = gate.shape[-1]
    if kern is None or gate.shape != up.shape or gate.dtype != up.dtype or gate.numel() == 0:
        return silu_mul_reference(gate, up)
    g2, u2 = _rows(gate, width), _rows(up, width)
    if g2 is None or u2 is None:
        return silu_mul_reference(gate, up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    block = 1024
    kern.silu_mul[(g2.shape[0], -(-width // block))](g2, u2, out, width, g2.stride(0), u2.stride(0), BLOCK=block)
    return out


def _rows(x: torch.Tensor, width: int) -> torch.Tensor | None:
    """x as a (rows, width) view with unit column stride, or None where that needs a copy."""
    try:
        rows = x.view(-1, width)  # (rows, width)
    except RuntimeError:
        return None
    return rows if rows.stride(1) == 1 or width == 1 else None


# --- RoPE of q and k, and the cache write -------------------------------------------------------------------

def rope_store_reference(
    heads: torch.Tensor, n_heads: int, rotation: tuple[torch.Tensor, torch.Tensor],
    keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
) -> torch.Tensor:
    """What the model does op by op: RoPE over q's and k's heads (llama/model.py apply_rope), then k and v
    stored at keys[b, :, slots[b, t]]; returns q (batch, seqlen, n_heads, head_dim)."""
    from llama.model import apply_rope  # the model imports this module

    n_kv = (heads.shape[2] - n_heads) // 2
    qk = apply_rope(heads[:, :, : n_heads + n_kv], rotation)
    q, k = qk.split((n_heads, n_kv), dim=2)
    rows = torch.arange(heads.shape[0], device=slots.device)[:, None]  # (batch, 1)
    keys[rows, :, slots] = k  # (batch, seqlen, n_kv, head_dim) at (slot b, :, position slots[b, t])
    values[rows, :, slots] = heads[:, :, n_heads + n_kv :]
    return q


def rope_factors(
    rotation: tuple[torch.Tensor, torch.Tensor], bsz: int, seqlen: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and +sin of each token's pairs, views (batch, seqlen, head_dim // 2) of llama.model.rope_rotation's factors."""
    cos = torch.broadcast_to(rotation[0], (bsz, seqlen, 1, head_dim // 2, 2))[:, :, 0, :, 0]
    sin = torch.broadcast_to(rotation[1], (bsz, seqlen, 1, head_dim // 2, 2))[:, :, 0, :, 1]
    return cos, sin


def rope_store(
    heads: torch.Tensor, n_heads: int, rotation: tuple[torch.Tensor, torch.Tensor],
    keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor,
) -> torch.Tensor:
    """heads (batch, seqlen, n_heads + 2 * n_kv_heads, head_dim): q, k, v of one fused projection. RoPE on q
    and k with rotation = llama.model.rope_rotation's factors; k and v go to keys/values (slots, n_kv_heads,
    capacity, head_dim) at row b, position slots[b, t] (slots (batch, seqlen) int64). Returns rotated q
    (batch, seqlen, n_heads, head_dim)."""
    kern = kernels_for(heads, keys, values, rotation[0], rotation[1])
    bsz, seqlen, n_all, head_dim = heads.shape
    n_kv = (n_all - n_heads) // 2
    if (kern is None or not _is_power_of_2(head_dim) or head_dim < 4 or heads.stride(3) != 1
            or heads.stride(2) != head_dim or keys.stride(3) != 1 or values.stride() != keys.stride() or slots.shape != (bsz, seqlen)
            or slots.device != heads.device or keys.dtype != values.dtype):
        return rope_store_reference(heads, n_heads, rotation, keys, values, slots)
    cos, sin = rope_factors(rotation, bsz, seqlen, head_dim)
    q = torch.empty(bsz, seqlen, n_heads, head_dim, dtype=heads.dtype, device=heads.device)
    kern.rope_store[(bsz * seqlen, n_heads + n_kv)](
        heads, cos, sin, slots, q, keys, values, seqlen, n_heads, n_kv,
        heads.stride(0), heads.stride(1), cos.stride(0), cos.stride(1), cos.stride(2), slots.stride(0),
        slots.stride(1), keys.stride(0), keys.stride(1), keys.stride(2), HALF=head_dim // 2, num_warps=1)
    return q


# --- attention of a few queries over the cache --------------------------------------------------------------

def attention_reference(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
    positions: torch.Tensor | None = None, paths: torch.Tensor | None = None, window: int | None = None,
) -> torch.Tensor:
    """q (batch, seqlen, n_heads, head_dim) over keys, values (batch, n_kv_heads, kv_len, head_dim), mask
    additive (batch or 1, seqlen, kv_len) or None -> (batch, seqlen, n_heads * head_dim). positions, paths,
    window: which slots each query sees instead of a mask (see visible_slots)."""
    bsz, seqlen, n_heads, _ = q.shape
    if positions is not None or paths is not None or window is not None:
        seen = visible_slots(positions, paths, window, bsz, seqlen, keys.shape[2], q.device)
        mask = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill_(~seen, float("-inf"))
    attn_mask = None if mask is None else mask[:, None]  # (batch or 1, 1, seqlen, kv_len)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=attn_mask,
                                         enable_gqa=n_heads != keys.shape[1])
    return out.transpose(1, 2).reshape(bsz, seqlen, -1)


def visible_slots(
    positions: torch.Tensor | None, paths: torch.Tensor | None, window: int | None,
    bsz: int, seqlen: int, kv_len: int, device: torch.device,
) -> torch.Tensor:
    """(batch, seqlen, kv_len) bool: the cache slots each query sees. Query (b, t) sees positions [lo, hi): hi is
    positions[b, t] + 1 (kv_len without positions), lo is hi - window (0 without one). Position n sits at slot n,
    except that with paths (batch, seqlen, depth) int, the positions hi - 1 - j for j < depth sit at slot
    paths[b, t, j] where that is >= 0 (a token tree's node and its ancestors)."""
    n = torch.arange(kv_len, device=device)
    hi = (torch.full((bsz, seqlen), kv_len, device=device) if positions is None
          else torch.broadcast_to(positions.to(device), (bsz, seqlen)) + 1)[..., None]  # (batch, seqlen, 1)
    lo = torch.zeros_like(hi) if window is None else (hi - window).clamp(min=0)
    seen = (n >= lo) & (n < hi)  # by position
    if paths is None:
        return seen
    depth = paths.shape[-1]
    paths = torch.broadcast_to(paths.to(device), (bsz, seqlen, depth)).long()
    moved_from = hi - 1 - torch.arange(depth, device=device)  # (batch, seqlen, depth): positions that paths moves
    moved = (paths >= 0) & (moved_from >= lo)
    sink = torch.cat([seen, seen.new_zeros(bsz, seqlen, 1)], -1)  # column kv_len takes the writes of unmoved j
    sink.scatter_(2, torch.where(moved, moved_from, kv_len), False)  # not at their own slots...
    sink.scatter_(2, torch.where(moved, paths, kv_len), True)  # ...but at their paths' slots
    return sink[..., :kv_len]


def attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
    positions: torch.Tensor | None = None, paths: torch.Tensor | None = None, window: int | None = None,
    block: int = ATTENTION_BLOCK, programs: int = ATTENTION_PROGRAMS, warps: int = ATTENTION_WARPS,
    one_launch: bool = True,
) -> torch.Tensor:
    """Scaled dot-product attention as attention_reference, split over cache positions (flash-decoding).
    positions (batch, seqlen) int, paths (batch, seqlen, depth) int, window: see visible_slots (then no mask).
    Each query's splits depend only on the positions it sees, so it gets the same bits in any launch: a token
    tree's node (its ancestors through paths) what a one-token step at its position gets.
    block, programs, warps: the kernel's tile of positions, the programs a one-token step of one sequence aims
    at, warps per program; one_launch: the last split of each query head combines the splits (else a second
    launch does; the same bits, bench/attention_bench.py compares their speed)."""
    tensors = [t for t in (q, keys, values, mask) if t is not None]
    kern = kernels_for(*tensors)
    bsz, seqlen, n_heads, head_dim = q.shape
    n_kv, kv_len = keys.shape[1], keys.shape[2]
    queries = bsz * seqlen * n_heads
    if (kern is None or not _is_power_of_2(head_dim) or n_heads % n_kv or kv_len == 0
            or seqlen > (MAX_TREE_QUERIES if paths is not None else MAX_ATTENTION_QUERIES)
            or q.stride(3) != 1 or keys.stride(3) != 1 or values.stride(3) != 1 or keys.shape[0] != bsz
            or (mask is not None and (mask.stride(-1) != 1 or positions is not None or paths is not None))):
        return attention_reference(q, keys, values, mask, positions, paths, window)
    m = q if mask is None else torch.broadcast_to(mask, (bsz, seqlen, kv_len))  # (batch, seqlen, kv_len)
    pos = q if positions is None else torch.broadcast_to(positions.to(q.device), (bsz, seqlen))
    ways = q if paths is None else torch.broadcast_to(paths.to(device=q.device, dtype=torch.int32),
                                                      (bsz, seqlen, paths.shape[-1]))
    split_cap = max(1, min(MAX_SPLITS, -(-programs // n_heads)))
    splits = max(1, min(split_cap, -(-kv_len // block)))  # the most any query uses: its positions are < kv_len
    part_acc = torch.empty(queries, splits, head_dim, dtype=torch.float32, device=q.device)
    part_max = torch.empty(queries, splits, dtype=torch.float32, device=q.device)
    part_sum = torch.empty(queries, splits, dtype=torch.float32, device=q.device)
    out = torch.empty(bsz, seqlen, n_heads * head_dim, dtype=q.dtype, device=q.device)
    arrivals = _arrivals(q.device) if one_launch and queries <= MAX_ONE_LAUNCH_QUERIES else None
    kern.attention_split[(queries, splits)](  # without arrivals, COMBINE is off and part_max a placeholder for it
        q, keys, values, m, pos, ways, part_acc, part_max, part_sum, out,
        part_max if arrivals is None else arrivals, seqlen, n_heads, n_heads // n_kv, kv_len, split_cap,
        window or 0, ways.shape[-1] if paths is not None else 0, head_dim**-0.5,
        q.stride(0), q.stride(1), q.stride(2), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), m.stride(0), m.stride(1),
        pos.stride(0), pos.stride(1), ways.stride(0), ways.stride(1),
        HEAD_DIM=head_dim, BLOCK_N=block, HAS_MASK=mask is not None, HAS_POSITIONS=positions is not None,
        HAS_PATHS=paths is not None, WINDOWED=window is not None, COMBINE=arrivals is not None,
        SPLITS=MAX_SPLITS, num_warps=warps)
    if arrivals is None:
        kern.attention_combine[(queries,)](part_acc, part_max, part_sum, out, splits, HEAD_DIM=head_dim,
                                        SPLITS=MAX_SPLITS, num_warps=1)
    return out


def _arrivals(device: torch.device) -> torch.Tensor:
    """Zeroed int32 counters (MAX_ONE_LAUNCH_QUERIES,) for the one-launch attention on the current stream of
    `device`: each launch leaves them zero again, and launches on one stream run one after another."""
    stream = torch.cuda.current_stream(device)
    key = (device.index, stream.cuda_stream)
    if key not in _ARRIVALS:
        _ARRIVALS[key] = torch.zeros(MAX_ONE_LAUNCH_QUERIES, dtype=torch.int32, device=device)
    return _ARRIVALS[key]
