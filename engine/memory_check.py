"""Refuse a context whose KV cache cannot fit, before any weight is read, with the size it would need."""
from __future__ import annotations

import psutil
import torch

from llama.config import ModelArgs
from llama.errors import UserError


def free_bytes(device: torch.device) -> int:
    """Free memory where the KV cache will live: the GPU's free VRAM, or the RAM available to programs."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def check_kv_cache_fits(args: ModelArgs, ctx: int, dtype: torch.dtype, device: torch.device) -> None:
    """UserError naming --ctx when the KV cache alone needs more than the free memory of `device`."""
    need, free = args.kv_cache_bytes(ctx, dtype), free_bytes(device)
    if need > free:
        where = "VRAM" if device.type == "cuda" else "RAM"
        raise UserError(
            f"--ctx {ctx}: the KV cache would need {need / 2**30:.1f} GiB (2 x {args.n_layers} layers x {ctx} "
            f"positions x {args.n_kv_heads} KV heads x {args.head_dim} x {dtype.itemsize} bytes), more than the "
            f"{free / 2**30:.1f} GiB of free {where}; use a smaller --ctx"
        )
