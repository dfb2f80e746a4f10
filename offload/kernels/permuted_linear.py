"""An int4 linear whose weight columns are stored in another order (GPTQ act-order): y = W' x[..., perm]."""
from __future__ import annotations

import torch

from offload.kernels.int4_format import Int4Weight
from offload.kernels.linear import Int4Linear


class PermutedInt4Linear(Int4Linear):
    """perm: int64 [in], a buffer beside the format's (it moves and streams with them); column c of the
    stored weight multiplies input perm[c]."""

    def __init__(self, weight: Int4Weight, perm: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__(weight, bias)
        self.register_buffer("perm", perm.long())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.index_select(-1, self.perm.to(x.device)))
