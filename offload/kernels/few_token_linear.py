"""An nn.Linear whose CPU calls of a few tokens take the compiled GEMV: a token tree's or chain's pass.

torch's float32 GEMM on the CPU costs several one-token GEMVs for 2-8 tokens: on a 2-core AMD EPYC, a
4096 -> 11008 float32 weight took 11 ms for one token, 25-85 ms for 2-8 through F.linear and 9-38 ms through
the compiled kernel, which reads each tile of rows once for all the tokens (offload/kernels/csrc/gemv_tiles.h).
On the 16-core host of the lent H200 a Llama-2-7B-shape float32 pass of 2-7 tokens cost ~3x a one-token step,
which made speculation on the CPU slower than plain decoding. bfloat16 weights keep torch's GEMM, which already
reads them about once for a few tokens there. engine/cpu_decode.py swaps the class of a block's linears,
keeping their state and names.
"""
from __future__ import annotations

import torch
from torch import nn

from offload.kernels.cpu_ext import cpu_extension

FEW_TOKENS = 8  # calls of up to this many tokens take the compiled kernel
COMPILED_DTYPES = (torch.float32, torch.float16)


class FewTokenLinear(nn.Linear):
    @classmethod
    def takes(cls, module: nn.Module) -> bool:
        return type(module) is nn.Linear and module.weight.dtype in COMPILED_DTYPES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[:-1].numel()
        ext = cpu_extension() if tokens <= FEW_TOKENS and x.device.type == "cpu" else None
        if ext is None or torch.is_grad_enabled() or not self.weight.is_contiguous():
            return super().forward(x)
        tensors = [self.weight] if self.bias is None else [self.weight, self.bias]
        return ext.linear(x.reshape(tokens, -1).contiguous(), tensors).view(*x.shape[:-1], -1)
