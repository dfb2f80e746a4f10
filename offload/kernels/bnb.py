"""bitsandbytes LLM.int8 (Linear8bitLt) for weights that stay resident on the GPU (`--use_8bit`)."""
from __future__ import annotations

import torch.nn as nn

from offload.errors import MissingDependency


def bnb_int8_linear(linear: nn.Linear, threshold: float = 6.0) -> nn.Module:
    """A bitsandbytes Linear8bitLt holding `linear`'s weights, quantized now where `linear` is; it can move
    between devices afterwards. Outlier columns above `threshold` stay fp16."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise MissingDependency(f"LLM.int8 needs bitsandbytes (pip install bitsandbytes): {e}") from e
    new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              has_fp16_weights=False, threshold=threshold, device="meta")
    new.weight = bnb.nn.Int8Params(linear.weight.detach().to("cpu"), requires_grad=False,
                                   has_fp16_weights=False)
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
    return new.to(linear.weight.device)  # bitsandbytes quantizes a CPU-held weight as it moves, to any device
