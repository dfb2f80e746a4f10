"""The slot cache: sequences of different lengths decoded in one batched forward give each sequence's
logits as decoding it alone does (Llama, and Mistral with GQA and a sliding window)."""
from __future__ import annotations

import pytest
import torch
from fixtures import random_state, tiny_args

from llama.kv_cache import KVCache
from llama.model import Transformer
from llama.slot_cache import SlotKVCache


def _model(arch: str, **shape) -> Transformer:
    args = tiny_args(arch, **shape)
    model = Transformer(args)
    model.load_state_dict(random_state(args, seed=3), strict=False)
    return model.eval()


def _alone(model: Transformer, prompt: list[int], steps: list[int]) -> list[torch.Tensor]:
    """Logits after the prompt and after each step token, decoding this sequence by itself."""
    cache = KVCache(model.args, 64, torch.float32)
    out = [model(torch.tensor([prompt]), 0, cache, last_only=True)[0, -1]]
    for i, token in enumerate(steps):
        out.append(model(torch.tensor([[token]]), len(prompt) + i, cache)[0, -1])
    return out


@pytest.mark.parametrize("arch, shape", [("llama", {}), ("mistral", {"sliding_window": 6})])
@torch.inference_mode()
def test_batched_steps_match_each_sequence_alone(arch, shape):
    model = _model(arch, **shape)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (5, 11, 2)]
    steps = [torch.randint(0, 256, (4,), generator=gen).tolist() for _ in prompts]
    expected = [_alone(model, p, s) for p, s in zip(prompts, steps)]

    cache = SlotKVCache(model.args, slots=4, capacity=64, dtype=torch.float32)
    lengths = []
    for slot, prompt in enumerate(prompts):  # prefill each sequence through its slot's ordinary view
        logits = model(torch.tensor([prompt]), 0, cache.slot(slot), last_only=True)[0, -1]
        torch.testing.assert_close(logits, expected[slot][0])
        lengths.append(len(prompt))
    for i in range(4):
        positions = torch.tensor(lengths)[:, None]  # (B, 1)
        step = cache.batch(positions, kv_len=max(lengths) + 1)
        tokens = torch.tensor([s[i] for s in steps])[:, None]
        logits = model(tokens, 0, step, positions=positions, mask=step.mask(model.args.sliding_window))
        for b in range(len(prompts)):
            torch.testing.assert_close(logits[b, -1], expected[b][i + 1], rtol=1e-4, atol=1e-4)
        lengths = [n + 1 for n in lengths]


@torch.inference_mode()
def test_move_keeps_a_sequence_decodable_in_its_new_slot():
    model = _model("llama")
    prompt, token = [3, 14, 15, 92, 65], 35
    expected = _alone(model, prompt, [token])
    cache = SlotKVCache(model.args, slots=3, capacity=32, dtype=torch.float32)
    model(torch.tensor([prompt]), 0, cache.slot(2))
    cache.move(2, 0, len(prompt))
    positions = torch.tensor([[len(prompt)]])
    step = cache.batch(positions, kv_len=len(prompt) + 1)
    logits = model(torch.tensor([[token]]), 0, step, positions=positions, mask=step.mask())
    torch.testing.assert_close(logits[0, -1], expected[1], rtol=1e-4, atol=1e-4)


def test_batch_beyond_capacity_is_refused():
    cache = SlotKVCache(tiny_args(), slots=2, capacity=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="overflow"):
        cache.batch(torch.tensor([[8]]), kv_len=9)
