"""Helpers for the offload tests: greedy decoding over Transformer.forward, and offloaded copies of a model."""
from __future__ import annotations

import torch

from llama.config import ModelArgs
from llama.kv_cache import KVCache
from llama.loader import model_from_state
from llama.model import Transformer
from offload.engine import OffloadedModel, apply_offload
from offload.policy import OffloadConfig

PROMPT = [1, 17, 42, 99, 7, 3, 250, 31]


@torch.inference_mode()
def greedy(
    model: Transformer, args: ModelArgs, device: str, dtype: torch.dtype, steps: int, max_seq_len: int = 128
) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens after PROMPT, and the logits (steps, vocab) each was chosen from."""
    cache = KVCache(args, max_seq_len, dtype, device)
    logits = model(torch.tensor([PROMPT], device=device), 0, cache, last_only=True)
    tokens, seen = [], []
    for pos in range(len(PROMPT), len(PROMPT) + steps):
        seen.append(logits[0, -1].float().cpu())
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        tokens.append(int(nxt))
        logits = model(nxt.to(device), pos, cache, last_only=True)
    return tokens, torch.stack(seen)


def offloaded(args: ModelArgs, state: dict[str, torch.Tensor], config: OffloadConfig) -> tuple[Transformer, OffloadedModel]:
    """A meta-built model filled from `state` through apply_offload."""
    with torch.device("meta"):
        model = Transformer(args)
    return model, apply_offload(model, iter(state.items()), config)


def resident(args: ModelArgs, state: dict[str, torch.Tensor], device: str, dtype: torch.dtype) -> Transformer:
    """The plain model, every weight on `device` in `dtype`, as the loader builds it."""
    return model_from_state(args, state, dtype, device)
