"""int4 on CUDA through torch's tinygemm op (`torch.ops.aten._weight_int4pack_mm`, bfloat16 only).

tinygemm wants its own weight layout, made on the GPU by `_convert_weight_to_int4pack`. `prepare_for_cuda`
does that once per weight; the result is an ordinary format whose tensors can be moved back to pinned host
memory and streamed like any other (the layout does not depend on where the bytes sit).
tinygemm dequantizes as w = (q - 8) * scale + zero', so zero' = scale * (8 - zero) in our convention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from offload.kernels.bundle import TensorBundle
from offload.kernels.int4_format import Int4Weight

TINYGEMM_GROUP_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class Int4CudaWeight(TensorBundle):
    """weight_int4pack: int32 [out/8, in/(16*inner_k_tiles), 32, inner_k_tiles/2] (tinygemm's layout);
    scales_and_zeros: bfloat16 [in/group_size, out, 2] holding (scale, tinygemm zero) pairs."""

    weight_int4pack: torch.Tensor
    scales_and_zeros: torch.Tensor

    def __post_init__(self) -> None:
        p, sz = self.weight_int4pack, self.scales_and_zeros
        if p.dtype != torch.int32 or p.dim() != 4 or p.shape[2] != 32:
            raise ValueError(f"Int4CudaWeight.weight_int4pack must be int32 [out/8, k_tiles, 32, inner/2], got "
                             f"{p.dtype} {tuple(p.shape)}")
        if sz.dtype != torch.bfloat16 or sz.dim() != 3 or sz.shape[2] != 2 or sz.shape[1] != 8 * p.shape[0]:
            raise ValueError(f"Int4CudaWeight.scales_and_zeros must be bfloat16 [groups, {8 * p.shape[0]}, 2], "
                             f"got {sz.dtype} {tuple(sz.shape)}")

    @property
    def out_features(self) -> int:
        return self.scales_and_zeros.shape[1]

    @property
    def in_features(self) -> int:
        inner_k_tiles = 2 * self.weight_int4pack.shape[3]
        return self.weight_int4pack.shape[1] * 16 * inner_k_tiles

    @property
    def group_size(self) -> int:
        return self.in_features // self.scales_and_zeros.shape[0]


def tinygemm_supports(w: Int4Weight) -> bool:
    """Whether tinygemm can multiply this weight: out % 8 == 0, in % 32 == 0, group size 32..256."""
    return w.out_features % 8 == 0 and w.in_features % 32 == 0 and w.group_size in TINYGEMM_GROUP_SIZES


def tinygemm_scales_and_zeros(w: Int4Weight) -> torch.Tensor:
    """bfloat16 [groups, out, 2]: (scale, scale * (8 - zero)) so that (q - 8) * scale + that = (q - zero) * scale,
    computed in float32 and rounded once."""
    s, z = w.scales, w.zeros
    if s.dtype == torch.bfloat16 and z.dtype == torch.bfloat16:  # what streams (stored in the run's bfloat16)
        # Three launches instead of seven; streamed decode converts every call, and at groups of 32 (GGUF) the
        # seven cost 290 us of the H200 per 4096x11008 call against 107 here. 8s - s*z in float32 equals
        # float32's s * (8 - z): s*z is exact for 8-bit significands, and so is 8 - z unless |z| < 2^-13.
        sz = torch.empty(s.shape[1], s.shape[0], 2, dtype=torch.bfloat16, device=s.device)
        sz[..., 0].copy_(s.T)
        torch.addcmul(s.T * 8, s.T, z.T, value=-1, out=sz[..., 1])
        return sz
    s, z = s.float(), z.float()
    return torch.stack([s, s * (8.0 - z)], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


def _inner_k_tiles(in_features: int) -> int:
    return next(t for t in (8, 4, 2) if in_features % (16 * t) == 0)


def prepare_for_cuda(w: Int4Weight, device: torch.device | str = "cuda") -> Int4CudaWeight:
    """Convert an Int4Weight to tinygemm's layout on `device` (a CUDA device); done once per weight."""
    if not tinygemm_supports(w):
        raise ValueError(f"tinygemm cannot take a [{w.out_features}, {w.in_features}] int4 weight with group "
                         f"size {w.group_size} (needs out % 8 == 0, in % 32 == 0, group in {TINYGEMM_GROUP_SIZES})")
    packed = w.packed.to(device).contiguous()
    weight_int4pack = torch.ops.aten._convert_weight_to_int4pack(packed, _inner_k_tiles(w.in_features))
    return Int4CudaWeight(weight_int4pack=weight_int4pack,
                          scales_and_zeros=tinygemm_scales_and_zeros(w).to(device))


def int4_matmul_tinygemm(x: torch.Tensor, w: Int4CudaWeight) -> torch.Tensor:
    """x [tokens, in] (any float dtype, computed in bfloat16) -> [tokens, out] in x's dtype."""
    if w.weight_int4pack.device.type != "cuda":
        raise ValueError("an Int4CudaWeight (tinygemm layout) is multiplied on CUDA only; move its tensors to "
                         "the GPU, or keep the Int4Weight for CPU compute")
    xb = x.to(torch.bfloat16).contiguous()
    y = torch.ops.aten._weight_int4pack_mm(xb, w.weight_int4pack, w.group_size, w.scales_and_zeros)
    return y.to(x.dtype)


def int4_matmul_converting(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """x [tokens, in] @ w for an Int4Weight on CUDA (one tinygemm supports), converted to tinygemm's layout for
    this call only: a streamed weight, whose slot holds another block's bytes next time. What prepare_for_cuda
    then int4_matmul_tinygemm compute, with none of their checks and copies (on the H200 a 4096x4096 call at
    groups of 32 took 69 us of the host and 67 of the GPU, against 109 and 100)."""
    packed = torch.ops.aten._convert_weight_to_int4pack(w.packed.contiguous(), _inner_k_tiles(w.in_features))
    y = torch.ops.aten._weight_int4pack_mm(x.to(torch.bfloat16).contiguous(), packed, w.group_size,
                                           tinygemm_scales_and_zeros(w))
    return y.to(x.dtype)
