"""Helpers for the offload tests: the prompt they decode from, and offloaded and resident copies of a model."""
from __future__ import annotations

import torch

from llama.config import ModelArgs
from llama.loader import model_from_state
from llama.model import Transformer
from offload.engine import OffloadedModel, apply_offload
from offload.policy import OffloadConfig

PROMPT = [1, 17, 42, 99, 7, 3, 250, 31]


def offloaded(args: ModelArgs, state: dict[str, torch.Tensor], config: OffloadConfig) -> tuple[Transformer, OffloadedModel]:
    """A meta-built model filled from `state` through apply_offload."""
    with torch.device("meta"):
        model = Transformer(args)
    return model, apply_offload(model, iter(state.items()), config)


def resident(args: ModelArgs, state: dict[str, torch.Tensor], device: str, dtype: torch.dtype) -> Transformer:
    """The plain model, every weight on `device` in `dtype`, as the loader builds it."""
    return model_from_state(args, state, dtype, device)
