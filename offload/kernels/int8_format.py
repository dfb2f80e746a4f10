"""int8 weight-only format: symmetric, one scale per output channel (w ~= qweight * scale[:, None]) or, for
checkpoints that arrive grouped (GGUF Q8_0: 32 inputs per scale), one per group of input channels
(w[n, k] ~= qweight[n, k] * scale[n, k // group_size]). The group size is derived from scale's shape."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from offload.kernels.bundle import TensorBundle

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Int8Weight(TensorBundle):
    """qweight: int8 [out, in] in [-127, 127]; scale: float [out] or [out, in/group_size] (float32, bfloat16
    or float16)."""

    qweight: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self) -> None:
        if self.qweight.dtype != torch.int8 or self.qweight.dim() != 2:
            raise ValueError(f"Int8Weight.qweight must be int8 [out, in], got {self.qweight.dtype} "
                             f"{tuple(self.qweight.shape)}")
        n, k = self.qweight.shape
        s = self.scale
        grouped = s.dim() == 2 and s.shape[0] == n and 0 < s.shape[1] <= k and k % s.shape[1] == 0
        if s.dtype not in FLOAT_DTYPES or not (tuple(s.shape) == (n,) or grouped):
            raise ValueError(f"Int8Weight.scale must be float [{n}] or [{n}, groups], got {s.dtype} {tuple(s.shape)}")

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def group_size(self) -> int:
        """Inputs per scale: in_features for one scale per output channel."""
        return self.in_features if self.scale.dim() == 1 else self.in_features // self.scale.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full-size weight [out, in], computed in float32 and returned in `dtype`."""
        n, k, g = self.out_features, self.in_features, self.group_size
        scale = self.scale.float().view(n, k // g, 1)  # (out, groups, 1)
        return (self.qweight.float().view(n, k // g, g) * scale).view(n, k).to(dtype)


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> Int8Weight:
    """Quantize a float weight [out, in]; scale = max|w_row| / 127, rounded to `scale_dtype` before use."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_int8 needs a float [out, in] weight, got {w.dtype} {tuple(w.shape)}")
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(scale_dtype).tiny).to(scale_dtype)
    q = torch.round(wf / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8Weight(qweight=q, scale=scale)
