"""int4 weight-only format: asymmetric, one scale and one integer zero point per group of input channels.

w[n, k] ~= (q[n, k] - zeros[n, g]) * scales[n, g] with g = k // group_size and q in [0, 15].
Two values per byte: q[n, 2j] in the high nibble of packed[n, j] and q[n, 2j + 1] in the low nibble
(the byte order torch's `_convert_weight_to_int4pack` expects on CUDA).
The group size is chosen per matrix (int4_group_size): the requested one (128), else half of it, else a
quarter, the first that divides in_features (a 576-wide model gets 64); a layer narrower than the request is
one group (tiny test models). Each choice is recorded by the format itself (scales has in/group columns) and
announced once per width. No padding, so a format's shapes are always the layer's shapes.
"""
from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from offload.errors import FormatError
from offload.kernels.bundle import TensorBundle
from offload.kernels.int8_format import FLOAT_DTYPES


@dataclass(frozen=True)
class Int4Weight(TensorBundle):
    """packed: uint8 [out, in/2]; scales, zeros: [out, in/group_size], one float dtype (zeros are integers)."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor

    def __post_init__(self) -> None:
        p, s, z = self.packed, self.scales, self.zeros
        if p.dtype != torch.uint8 or p.dim() != 2:
            raise ValueError(f"Int4Weight.packed must be uint8 [out, in/2], got {p.dtype} {tuple(p.shape)}")
        if s.dtype not in FLOAT_DTYPES or s.dim() != 2 or s.shape[0] != p.shape[0] or s.shape[1] == 0:
            raise ValueError(f"Int4Weight.scales must be float [{p.shape[0]}, groups], got {s.dtype} "
                             f"{tuple(s.shape)}")
        if z.dtype != s.dtype or z.shape != s.shape:
            raise ValueError(f"Int4Weight.zeros must match scales ({s.dtype} {tuple(s.shape)}), got {z.dtype} "
                             f"{tuple(z.shape)}")
        if (2 * p.shape[1]) % s.shape[1] or (2 * p.shape[1] // s.shape[1]) % 2:
            raise ValueError(f"Int4Weight: {2 * p.shape[1]} inputs do not split into {s.shape[1]} even groups")

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def in_features(self) -> int:
        return 2 * self.packed.shape[1]

    @property
    def group_size(self) -> int:
        return self.in_features // self.scales.shape[1]

    def unpack(self) -> torch.Tensor:
        """The 4-bit values as uint8 [out, in] in [0, 15]."""
        hi, lo = self.packed >> 4, self.packed & 15
        return torch.stack([hi, lo], dim=-1).reshape(self.out_features, self.in_features)  # (out, in)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full-size weight [out, in], computed in float32 and returned in `dtype`."""
        n, k, g = self.out_features, self.in_features, self.group_size
        q = self.unpack().float().view(n, k // g, g)  # (out, groups, group_size)
        w = (q - self.zeros.float()[..., None]) * self.scales.float()[..., None]
        return w.view(n, k).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in] values in [0, 15] -> uint8 [out, in/2], even index in the high nibble."""
    return (q[:, 0::2] << 4) | q[:, 1::2]


def int4_group_size(in_features: int, group_size: int = 128) -> int:
    """The group size a matrix with in_features inputs gets when group_size is asked for (module docstring)."""
    if in_features <= group_size:
        return in_features
    for g in (group_size, group_size // 2, group_size // 4):
        if g >= 2 and in_features % g == 0:
            return g
    raise FormatError(f"int4: in_features {in_features} is not a multiple of {group_size}, {group_size // 2} or "
                    f"{group_size // 4}; use --quant int8 for this model")


@functools.cache  # once per distinct message: every block of a model has the same widths
def _note_once(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def quantize_int4(w: torch.Tensor, group_size: int = 128, scale_dtype: torch.dtype | None = None) -> Int4Weight:
    """Quantize a float weight [out, in] per group of int4_group_size(in, group_size) inputs, the range of each
    group clipped for the least squared error; scales and zeros in `scale_dtype` (default: w's dtype)."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_int4 needs a float [out, in] weight, got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    asked, group_size = group_size, int4_group_size(k, group_size)
    if group_size < 2 or group_size % 2:
        raise FormatError(f"int4 group size must be an even number >= 2, got {group_size}")
    if group_size < min(asked, k):
        _note_once(f"note: int4: {k} inputs are not a multiple of {asked}; such matrices use groups of {group_size}")
    scale_dtype = scale_dtype or (w.dtype if w.dtype in FLOAT_DTYPES else torch.float32)
    wg = w.float().reshape(n, k // group_size, group_size)  # (out, groups, group_size)
    # The range always includes 0, so zero points fall in [0, 15]. Each group keeps the clipped range
    # (a fraction of min/max) that reconstructs it best: outliers cost less than coarse steps for the rest.
    lo0, hi0 = wg.amin(dim=-1).clamp(max=0), wg.amax(dim=-1).clamp(min=0)
    best_err = torch.full(lo0.shape, float("inf"))
    scales = zeros = torch.empty(0)
    for clip in CLIP_RATIOS:
        s, z, q = _quantize_range(wg, lo0 * clip, hi0 * clip, scale_dtype)
        err = ((q - z.float()[..., None]) * s.float()[..., None] - wg).pow(2).sum(-1)  # (out, groups)
        if scales.numel() == 0:
            scales, zeros, best_q, best_err = s, z, q, err
            continue
        better = err < best_err
        scales, zeros = torch.where(better, s, scales), torch.where(better, z, zeros)
        best_q = torch.where(better[..., None], q, best_q)
        best_err = torch.minimum(err, best_err)
    return Int4Weight(packed=pack_int4(best_q.to(torch.uint8).view(n, k)), scales=scales, zeros=zeros)


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8)


def _quantize_range(
    wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scales, zeros (out, groups) and levels (out, groups, group_size) for the range [lo, hi] per group."""
    scales = ((hi - lo) / 15.0).clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype)
    zeros = torch.round(-lo / scales.float()).clamp_(0, 15).to(scale_dtype)
    q = torch.round(wg / scales.float()[..., None] + zeros.float()[..., None]).clamp_(0, 15)
    return scales, zeros, q
