"""How many sequences the server decodes at once: --max_batch, or as many KV cache slots as fit a share of
the memory left beside the weights.

Each slot holds one sequence's whole context: ctx x 2 x layers x KV heads x head_dim x element bytes
(2 GiB for Llama-2-7B at 4096 tokens in fp16). Without --max_batch the slots may take half of what is free
for them, at most DEFAULT_BATCH_CAP slots:
  streamed (--use_offload): the GPU budget (--gpu_mem, or free VRAM less a margin; --gpu_split: their sum);
      the weights live in host RAM, and the planner keeps resident what the other half holds;
  resident on a GPU: free VRAM less the weights;  on the CPU: available RAM less the weights.
The weights are counted at the model's dtype (quantized ones are smaller, so this errs towards fewer slots).
"""
from __future__ import annotations

import math

import torch

from engine.config import RunConfig
from engine.memory_check import free_bytes
from llama.config import ModelArgs

DEFAULT_BATCH_CAP = 16  # sixteen sequences share each pass of the weights; more is --max_batch's to ask for
KV_SHARE = 0.5  # of the memory free for them, what the slots may take by default


def batch_slots(cfg: RunConfig, args: ModelArgs, ctx: int, dtype: torch.dtype, device: torch.device) -> int:
    """KV cache slots to allocate: --max_batch; else, when serving, as many as fit; else one (the console)."""
    if cfg.max_batch is not None:
        return cfg.max_batch
    if cfg.serve is None:
        return 1
    return default_max_batch(args.kv_cache_bytes(ctx, dtype), room_for_slots(cfg, args, dtype, device))


def default_max_batch(slot_bytes: int, room: int) -> int:
    return max(1, min(DEFAULT_BATCH_CAP, int(room * KV_SHARE) // slot_bytes))


def room_for_slots(cfg: RunConfig, args: ModelArgs, dtype: torch.dtype, device: torch.device) -> int:
    """Bytes the KV slots could use where they live (see the module's docstring)."""
    if cfg.use_offload:
        from offload.policy import default_budget

        if cfg.gpu_split is not None:  # split across --gpus: the slots' layers are spread over them too
            return sum(cfg.gpu_split)
        return cfg.gpu_mem if cfg.gpu_mem is not None else default_budget(device)
    weights = sum(math.prod(s) for s in args.weight_shapes().values()) * dtype.itemsize
    return max(0, free_bytes(device) - weights)
