"""Plumbing every test file shares: the one `cuda` skip, the one greedy decoding loop, and engines closed after
each test (closing_engines).

Mark a test `@pytest.mark.cuda` and it is skipped, with its reason, on a machine without a CUDA GPU.
"""
from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from engine.build import build_engine
from engine.config import RunConfig
from llama.kv_cache import KVCache
from llama.model import Transformer


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def closing_engines():
    """Builds engines (call it with a RunConfig) and closes them after the test: a streaming engine left open keeps
    cuDNN attention off for the whole process, which changed later files' greedy tokens at near-ties."""
    built = []

    def build(cfg: RunConfig):
        built.append(build_engine(cfg))
        return built[-1]

    yield build
    for engine in built:
        engine.close()


@torch.inference_mode()
def greedy(
    model: Transformer, prompt: list[int], steps: int, device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32, max_seq_len: int | None = None,
    cache_devices: Sequence[torch.device] | None = None,
) -> tuple[list[int], torch.Tensor]:
    """Prefill `prompt`, then decode `steps` tokens one at a time through a KV cache (on `device`, or per layer
    on cache_devices), each the argmax. Returns the tokens and the logits (steps, vocab) each was chosen from, as
    float32 on the CPU."""
    cache = KVCache(model.args, max_seq_len or len(prompt) + steps, dtype, cache_devices or device)
    logits = model(torch.tensor([prompt], device=device), 0, cache, last_only=True)
    tokens, seen = [], []
    for pos in range(len(prompt), len(prompt) + steps):
        seen.append(logits[0, -1].float().cpu())
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
        tokens.append(int(nxt))
        logits = model(nxt.to(device), pos, cache, last_only=True)
    return tokens, torch.stack(seen)
