"""A model split across two "devices" on the CPU (both cpu): the split plan, one ring per device over the shared
host store, the input-moving hooks and a KV cache per layer's device give the unsplit model's greedy tokens and
logits exactly, whatever the split."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import greedy
from fixtures import make_meta_checkpoint, random_state, tiny_args
from offload_testing import PROMPT, offloaded, resident

from engine.llama_offload import build_offloaded_model
from llama.slot_cache import SlotKVCache
from offload.placement import HostEmbedding
from offload.policy import OffloadConfig
from offload.split_run import SplitOffloadedModel, moved

STEPS = 12
CPU = torch.device("cpu")


def split_config(**kw: object) -> OffloadConfig:
    return OffloadConfig(**{"dtype": torch.float32, "device": CPU, "devices": (CPU, CPU), "verbose": False,
                            "max_seq_len": 64, **kw})


@pytest.fixture(scope="module")
def model4() -> tuple:
    args = tiny_args(n_layers=4)
    state = random_state(args, seed=5)
    return args, state, greedy(resident(args, state, "cpu", torch.float32), PROMPT, STEPS)


@pytest.mark.parametrize("split", [(1, 3), (2, 2), (3, 1), None])
@pytest.mark.parametrize("n_slots", [1, 2])
def test_split_streamed_matches_unsplit(model4: tuple, split: tuple[int, int] | None, n_slots: int) -> None:
    args, state, (ref_tokens, ref_logits) = model4
    model, off = offloaded(args, state, split_config(exclusions=frozenset(), split=split, n_slots=n_slots))
    assert isinstance(off, SplitOffloadedModel) and isinstance(model.tok_embeddings, HostEmbedding)
    sizes = [len(c.blocks) for c in off.plan.cards]
    assert len(sizes) == 2 and sum(sizes) == 4 and (split is None or tuple(sizes) == split)
    assert len(off.streams) == 2 and off.streamed_bytes == off.plan.streamed_bytes > 0  # a ring per device
    first, last = off.plan.cards
    assert set(off.streams[0]._streamed) == set(first.blocks) and set(off.streams[1]._streamed) == set(last.blocks)
    tokens, logits = greedy(model, PROMPT, STEPS, cache_devices=off.block_devices)
    assert tokens == ref_tokens and torch.equal(logits, ref_logits)
    off.close()
    assert not off.streams and not model.layers[last.first]._forward_pre_hooks


def test_budgets_mix_resident_and_streamed_per_device(model4: tuple) -> None:
    args, state, (ref_tokens, ref_logits) = model4
    _, whole = offloaded(args, state, split_config(split=(2, 2)))  # no budgets: everything resident
    assert not whole.streams and whole.streamed_bytes == 0
    need = [c.plan.gpu_bytes for c in whole.plan.cards]
    block = whole.plan.footprint.block_bytes
    budgets = (need[0] - block // 2, need[1] - block // 4)  # too small for both blocks, not for one and a slot
    model, off = offloaded(args, state, split_config(device_budgets=budgets, split=(2, 2), n_slots=1))
    assert all(c.plan.gpu_bytes <= c.plan.budget for c in off.plan.cards)
    assert all(c.plan.streamed_bytes > 0 for c in off.plan.cards) and len(off.streams) == 2
    tokens, logits = greedy(model, PROMPT, STEPS, cache_devices=off.block_devices)
    assert tokens == ref_tokens and torch.equal(logits, ref_logits)


def test_batched_step_over_a_per_layer_cache(model4: tuple) -> None:
    """Two sequences decoded together through a SlotKVCache laid out per layer give each one's own logits."""
    args, state, _ = model4
    model, off = offloaded(args, state, split_config(exclusions=frozenset(), split=(1, 3)))
    ref = resident(args, state, "cpu", torch.float32)
    prompts = [PROMPT, PROMPT[::-1]]
    kv, ref_kv = SlotKVCache(args, 2, 32, torch.float32, off.block_devices), SlotKVCache(args, 2, 32, torch.float32)
    with torch.inference_mode():
        for s, p in enumerate(prompts):
            for net, cache in ((model, kv), (ref, ref_kv)):
                net(torch.tensor([p]), 0, cache.slot(s))
        positions = torch.tensor([[len(p)] for p in prompts])  # (batch, 1)
        outs = []
        for net, cache in ((model, kv), (ref, ref_kv)):
            step = cache.batch(positions, kv_len=len(PROMPT) + 1)
            outs.append(net(torch.tensor([[5], [6]]), 0, step, positions=positions, mask=step.mask()))
    assert torch.equal(outs[0], outs[1])


def test_build_from_checkpoint_directory_split(tmp_path: Path) -> None:
    args = tiny_args(n_layers=3)
    state = make_meta_checkpoint(args, tmp_path, seed=6)
    ref = greedy(resident(args, state, "cpu", torch.float32), PROMPT, STEPS)
    model, off = build_offloaded_model(tmp_path, split_config(exclusions=frozenset()))
    assert off.store.blocks == [0, 1, 2] and off.block_devices == (CPU, CPU, CPU)
    tokens, logits = greedy(model, PROMPT, STEPS, cache_devices=off.block_devices)
    assert tokens == ref[0] and torch.equal(logits, ref[1])


def test_inputs_move_to_the_next_device_and_the_rest_stays() -> None:
    """What a range's first block receives: every tensor (the RoPE rotation's pair too) on its device."""
    h, cos, sin, mask, cache = torch.ones(1, 2, 4), torch.ones(2, 1), torch.zeros(2, 1), torch.zeros(2, 2), object()
    out = moved((h, (cos, sin), 3, cache, mask, None), torch.device("meta"))
    assert [t.device.type for t in (out[0], *out[1], out[4])] == ["meta"] * 4
    assert out[2] == 3 and out[3] is cache and out[5] is None
