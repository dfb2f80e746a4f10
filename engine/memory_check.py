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


def check_kv_cache_fits(args: ModelArgs, ctx: int, dtype: torch.dtype, device: torch.device, slots: int = 1) -> None:
    """UserError naming --ctx (and --max_batch when it holds several sequences) when the KV cache of `slots`
    sequences alone needs more than the free memory of `device`."""
    need, free = args.kv_cache_bytes(ctx, dtype, slots), free_bytes(device)
    if need > free:
        where = "VRAM" if device.type == "cuda" else "RAM"
        sequences = f"{slots} sequences (--max_batch) x " if slots > 1 else ""
        fix = "a smaller --ctx or --max_batch" if slots > 1 else "a smaller --ctx"
        raise UserError(
            f"--ctx {ctx}: the KV cache would need {need / 2**30:.1f} GiB ({sequences}2 x {args.n_layers} layers x "
            f"{ctx} positions x {args.n_kv_heads} KV heads x {args.head_dim} x {dtype.itemsize} bytes), more than "
            f"the {free / 2**30:.1f} GiB of free {where}; use {fix}"
        )
