"""bitsandbytes LLM.int8 (Linear8bitLt) for weights that stay resident on the GPU (`--use_8bit`)."""
from __future__ import annotations

import torch
import torch.nn as nn

from llama.errors import UserError


def bnb_int8_linear(linear: nn.Linear, device: torch.device | str | None = None,
                    threshold: float = 6.0) -> nn.Module:
    """A bitsandbytes Linear8bitLt holding `linear`'s weights, quantized now on `device` (default: where
    `linear` is); it can move between devices afterwards. Outlier columns above `threshold` stay fp16."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise UserError(f"--use_8bit needs bitsandbytes (pip install bitsandbytes): {e}") from e
    device = torch.device(device) if device is not None else linear.weight.device
    new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              has_fp16_weights=False, threshold=threshold, device="meta")
    new.weight = bnb.nn.Int8Params(linear.weight.detach().to("cpu"), requires_grad=False,
                                   has_fp16_weights=False)
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return new.to(device)  # bitsandbytes quantizes a CPU-held weight as it moves, to any device
