"""The offload engine on the CPU: streamed runs match the resident model exactly (same kernels, same dtype).

On the CPU the "device" slots are host memory and copies are synchronous, but the planning, the home
buffers, the ring, the hooks and the view binding are the ones a GPU run uses.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import greedy
from fixtures import make_meta_checkpoint, random_state, tiny_args
from offload_testing import PROMPT, offloaded, resident

from engine.llama_offload import build_offloaded_model
from engine.offload_messages import flag_message
from llama.kv_cache import KVCache
from offload.errors import NoGpu, WeightMismatch
from offload.placement import HostEmbedding
from offload.policy import OffloadConfig, plan_placement
from offload.quant_mode import QuantMode

STEPS = 16
ATT, FFN = frozenset({"wq", "wk", "wv", "wo"}), frozenset({"w1", "w2", "w3"})


def cpu_config(**kw: object) -> OffloadConfig:
    return OffloadConfig(**{"dtype": torch.float32, "device": torch.device("cpu"), "verbose": False, "max_seq_len": 128, **kw})


@pytest.fixture(scope="module")
def model4() -> tuple:
    args = tiny_args(n_layers=4)
    state = random_state(args, seed=1)
    return args, state, greedy(resident(args, state, "cpu", torch.float32), PROMPT, STEPS, "cpu", torch.float32)


@pytest.mark.parametrize(
    "exclusions, n_slots, sequential",
    [(frozenset(), 2, False), (frozenset(), 3, False), (FFN, 2, False), (ATT, 3, False), (frozenset(), 2, True)],
)
def test_streamed_matches_resident(model4: tuple, exclusions: frozenset, n_slots: int, sequential: bool) -> None:
    args, state, (ref_tokens, ref_logits) = model4
    model, off = offloaded(args, state, cpu_config(exclusions=exclusions, n_slots=n_slots, sequential=sequential))
    assert off.streaming is not None and off.streamed_bytes > 0
    assert isinstance(model.tok_embeddings, HostEmbedding)
    tokens, logits = greedy(model, PROMPT, STEPS, "cpu", torch.float32)
    assert tokens == ref_tokens
    assert torch.equal(logits, ref_logits)


def test_resident_units_are_not_streamed(model4: tuple) -> None:
    args, state, _ = model4
    model, off = offloaded(args, state, cpu_config(exclusions=FFN))
    for i, block in enumerate(model.layers):
        assert set(off.store.entries(i)) == {f"attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")}
        assert block.feed_forward.w1.weight.data_ptr() != off.store.buffer(i).data_ptr()
    one_block = sum(state[f"layers.0.attention.{w}.weight"].numel() * 4 for w in ("wq", "wk", "wv", "wo"))
    assert off.streamed_bytes == args.n_layers * one_block


def test_planner_with_budget_mixes_resident_and_streamed(model4: tuple) -> None:
    args, state, (ref_tokens, ref_logits) = model4
    model, off = offloaded(args, state, cpu_config())
    full = off.plan.gpu_bytes  # no budget: everything resident
    assert off.streaming is None
    budget = full - 3 * off.plan.footprint.block_bytes // 2
    model, off = offloaded(args, state, cpu_config(gpu_mem=budget))
    plan = off.plan
    assert plan.gpu_bytes <= budget and off.streaming is not None
    assert plan.resident_units or plan.n_resident_blocks  # some weights resident, some streamed
    tokens, logits = greedy(model, PROMPT, STEPS, "cpu", torch.float32)
    assert tokens == ref_tokens and torch.equal(logits, ref_logits)


def test_replan_without_reloading(model4: tuple) -> None:
    args, state, (ref_tokens, ref_logits) = model4
    model, off = offloaded(args, state, cpu_config(exclusions=frozenset()))
    for ex in (FFN, ATT, frozenset({"wq", "wk", "wv", "wo", "w1", "w2", "w3"}), frozenset()):
        off.replan(plan_placement(off.plan.footprint, None, 2, ex))
        tokens, logits = greedy(model, PROMPT, STEPS, "cpu", torch.float32)
        assert tokens == ref_tokens and torch.equal(logits, ref_logits)
    assert off.streaming is not None and off.streaming.n_slots == 2


def test_a_pass_that_raises_does_not_break_the_ring(model4: tuple) -> None:
    args, state, (ref_tokens, ref_logits) = model4
    model, _ = offloaded(args, state, cpu_config(exclusions=frozenset(), n_slots=3))
    small = KVCache(args, 4, torch.float32)
    with pytest.raises(ValueError, match="KV cache overflow"), torch.inference_mode():
        model(torch.tensor([[1, 2, 3, 4, 5, 6]]), 0, small)  # raises inside block 0, slot held
    tokens, logits = greedy(model, PROMPT, STEPS, "cpu", torch.float32)
    assert tokens == ref_tokens and torch.equal(logits, ref_logits)


@pytest.mark.parametrize("arch, tie", [("qwen2", False), ("mistral", False), ("llama", True)])
def test_other_families(arch: str, tie: bool) -> None:
    args = tiny_args(arch, n_layers=3, tie_embeddings=tie)
    state = random_state(args, seed=2)
    ref = greedy(resident(args, state, "cpu", torch.float32), PROMPT, STEPS, "cpu", torch.float32)
    model, off = offloaded(args, state, cpu_config(exclusions=frozenset()))
    if arch == "qwen2":
        assert "attention.wq.bias" in off.store.entries(0)  # biases travel with their unit
    tokens, logits = greedy(model, PROMPT, STEPS, "cpu", torch.float32)
    assert tokens == ref[0] and torch.equal(logits, ref[1])


def test_bfloat16_streaming(model4: tuple) -> None:
    args, state, _ = model4
    ref = greedy(resident(args, state, "cpu", torch.bfloat16), PROMPT, STEPS, "cpu", torch.bfloat16)
    model, _ = offloaded(args, state, cpu_config(dtype=torch.bfloat16, exclusions=frozenset()))
    tokens, logits = greedy(model, PROMPT, STEPS, "cpu", torch.bfloat16)
    assert tokens == ref[0] and torch.equal(logits, ref[1])


def test_build_from_checkpoint_directory(tmp_path: Path) -> None:
    args = tiny_args(n_layers=3)
    state = make_meta_checkpoint(args, tmp_path, seed=3)
    ref = greedy(resident(args, state, "cpu", torch.float32), PROMPT, STEPS, "cpu", torch.float32)
    model, off = build_offloaded_model(tmp_path, cpu_config(exclusions=frozenset()))
    assert off.store.blocks == [0, 1, 2]
    tokens, logits = greedy(model, PROMPT, STEPS, "cpu", torch.float32)
    assert tokens == ref[0] and torch.equal(logits, ref[1])


def test_unexpected_and_missing_weights(model4: tuple) -> None:
    args, state, _ = model4
    with pytest.raises(WeightMismatch, match="unexpected weight 'layers.0.attention.wz.weight'"):
        offloaded(args, {**state, "layers.0.attention.wz.weight": torch.zeros(1)}, cpu_config())
    partial = {k: v for k, v in state.items() if k != "layers.2.feed_forward.w2.weight"}
    with pytest.raises(WeightMismatch, match="missing weight 'layers.2.feed_forward.w2.weight'"):
        offloaded(args, partial, cpu_config())
    with pytest.raises(WeightMismatch, match="missing weight 'norm.weight'"):
        offloaded(args, {k: v for k, v in state.items() if k != "norm.weight"}, cpu_config())


def test_use_offload_without_gpu_suggests_cpu_mode(model4: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    args, state, _ = model4
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NoGpu) as e:
        offloaded(args, state, OffloadConfig(device=torch.device("cuda")))
    assert re.search("--use_offload.*CPU", flag_message(e.value))


@pytest.mark.parametrize("quant", [QuantMode.INT8, QuantMode.INT4])
def test_quantized_streaming_matches_quantized_resident(quant: QuantMode) -> None:
    from offload.kernels import quantize_linears

    args = tiny_args(n_layers=3, dim=128, n_heads=4, ffn_dim=256)
    state = random_state(args, seed=4)
    ref_model = resident(args, state, "cpu", torch.float32)
    for block in ref_model.layers:
        quantize_linears(block, quant, progress=False, group_size=128)
    ref = greedy(ref_model, PROMPT, STEPS, "cpu", torch.float32)
    model, off = offloaded(args, state, cpu_config(exclusions=frozenset(), quant=quant))
    assert not any(n.endswith(".weight") and "norm" not in n for n in off.store.entries(0))  # quantized bytes
    fp32_bytes = sum(t.numel() * 4 for n, t in state.items() if n.startswith("layers.") and "norm" not in n)
    assert off.streamed_bytes < 0.3 * fp32_bytes
    assert off.streamed_bytes == off.plan.streamed_bytes  # the planner's shape-only estimate is exact
    tokens, logits = greedy(model, PROMPT, STEPS, "cpu", torch.float32)
    assert tokens == ref[0] and torch.equal(logits, ref[1])


@pytest.mark.parametrize("n_slots", [2, 3])
def test_first_block_warm_up_leaves_the_ring_and_the_reply_as_they_were(model4: tuple, n_slots: int) -> None:
    """The load-time warm-up of a streamed model runs block 0 alone three times and the head once; the next whole
    passes restart the ring and decode exactly what a model never warmed up decodes."""
    from llama.generation import Generator, GenerationStats

    args, state, (ref_tokens, ref_logits) = model4
    model, off = offloaded(args, state, cpu_config(exclusions=frozenset(), n_slots=n_slots))
    gen = Generator(model, None, "cpu", 64, torch.float32, prefill_chunk=5)
    copies = []
    off.streaming.transfer.copy_fn = lambda block, slot: copies.append(block) or off.streaming._copy(block, slot)
    gen._warm_first_block()
    # Each of the three block-0 runs restarts the ring (n_slots copies) and its release fetches one more block.
    assert copies and set(copies) <= set(range(n_slots + 1)) and len(copies) == 3 * (n_slots + 1)
    assert gen.cached == []
    logits = gen.prefill(PROMPT, GenerationStats())
    tokens = []
    for pos in range(len(PROMPT), len(PROMPT) + STEPS):
        tokens.append(int(logits.argmax()))
        logits = gen._forward([tokens[-1]], pos)
    assert tokens == ref_tokens
