"""GPTQ and AWQ 4-bit tensors, as published, in our int4 format: repacked, nothing re-quantized.

Both hold, per linear with `in` inputs, `out` outputs and groups of G inputs, w[o, i] = (q[i, o] - z[g, o]) *
s[g, o] with scales fp16 [in/G, out]:
- GPTQ (AutoGPTQ / transformers, "gptq" checkpoint format): qweight int32 [in/8, out], value i = 8r + j in
  bits 4j..4j+3 of row r (packed along the inputs); qzeros int32 [in/G, out/8] packed along the outputs the
  same way, holding zero - 1 (the v1 format's offset; "gptq_v2" holds the zero itself); g_idx int32 [in], the
  group of each input. With act-order (desc_act) g_idx is not i // G: sorting the inputs by group (a stable
  argsort, `perm`) makes every group contiguous again, so the weight is stored with its columns in that
  order and the layer multiplies x[..., perm].
- AWQ (AutoAWQ "gemm"): qweight int32 [in, out/8] and qzeros int32 [in/G, out/8], both packed along the
  outputs with nibble k holding output 8c + AWQ_ORDER[k]; zeros as they are; groups always i // G.
"""
from __future__ import annotations

import torch

from offload.kernels.int4_format import Int4Weight, pack_int4

SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # nibble k of an int32 sits at bits 4k
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of a packed word holds output 8c + AWQ_ORDER[k]
AWQ_UNDO = tuple(AWQ_ORDER.index(j) for j in range(8))  # output 8c + j is in nibble AWQ_UNDO[j]


def unpack_int32(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words -> their 8 nibbles as uint8, spread along `dim` (word w's nibble k at 8w + k)."""
    nibbles = (packed.unsqueeze(-1) >> SHIFTS) & 15  # (..., 8)
    if dim == 0:
        nibbles = nibbles.movedim(-1, 1)  # (rows, 8, cols)
        return nibbles.reshape(-1, packed.shape[1]).to(torch.uint8)
    return nibbles.reshape(packed.shape[0], -1).to(torch.uint8)


def _from_inputs_major(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> Int4Weight:
    """q uint8 [in, out], zeros and scales [groups, out] -> our [out, ...] layout."""
    return Int4Weight(packed=pack_int4(q.t().contiguous()), scales=scales.t().contiguous(),
                      zeros=zeros.t().contiguous().to(scales.dtype))


def gptq_to_int4(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                 zero_offset: int = 1) -> tuple[Int4Weight, torch.Tensor | None]:
    """(our weight, the input permutation or None). zero_offset: 1 for "gptq" files, 0 for "gptq_v2"."""
    q = unpack_int32(qweight, dim=0)  # (in, out)
    zeros = unpack_int32(qzeros, dim=1).float() + zero_offset  # (groups, out)
    n_in, groups = q.shape[0], scales.shape[0]
    group = n_in // groups
    if g_idx is None or torch.equal(g_idx.long(), torch.arange(n_in) // group):
        return _from_inputs_major(q, zeros, scales), None
    perm = torch.sort(g_idx.long(), stable=True).indices  # inputs in group order
    if not torch.equal(g_idx.long()[perm], torch.arange(n_in) // group):
        raise ValueError(f"g_idx does not give every one of the {groups} groups {group} inputs")
    return _from_inputs_major(q[perm], zeros, scales), perm


def awq_to_int4(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> Int4Weight:
    undo = torch.tensor(AWQ_UNDO)

    def outputs(packed: torch.Tensor) -> torch.Tensor:  # (rows, out) in natural output order
        nibbles = unpack_int32(packed, dim=1).view(packed.shape[0], -1, 8)  # (rows, out/8, 8)
        return nibbles[..., undo].reshape(packed.shape[0], -1)

    return _from_inputs_major(outputs(qweight), outputs(qzeros).float(), scales)
