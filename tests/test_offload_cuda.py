"""The offload engine on a GPU: streamed runs give exactly the resident model's greedy tokens and logits.

While streaming, attention avoids cuDNN (offload/streaming.py says why), so the resident references run
with the same attention backends: same kernels, bit-identical logits.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import greedy
from fixtures import make_meta_checkpoint, random_state, tiny_args
from offload_testing import PROMPT, offloaded, resident

from llama.config import ModelArgs
from llama.model import Transformer
from offload.engine import OffloadedModel, build_offloaded_model
from offload.policy import OffloadConfig, plan_placement
from offload.quant_mode import QuantMode

pytestmark = [
    pytest.mark.cuda,
]

STEPS = 64
ATT, FFN = frozenset({"wq", "wk", "wv", "wo"}), frozenset({"w1", "w2", "w3"})


@contextmanager
def without_cudnn_attention() -> Iterator[None]:
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def reference(model: Transformer, args: ModelArgs, dtype: torch.dtype) -> tuple[list[int], torch.Tensor]:
    with without_cudnn_attention():
        return greedy(model, PROMPT, STEPS, "cuda", dtype)


@pytest.fixture
def closing() -> Iterator[list[OffloadedModel]]:
    """Offloaded models to close after the test, pass or fail (they hold pinned memory and a global flag)."""
    models: list[OffloadedModel] = []
    yield models
    for m in models:
        m.close()


def gpu_config(**kw: object) -> OffloadConfig:
    return OffloadConfig(**{"dtype": torch.float16, "device": torch.device("cuda"), "verbose": False, "max_seq_len": 128, **kw})


@pytest.fixture(scope="module")
def model6() -> tuple:
    args = tiny_args(n_layers=6, dim=128, n_heads=4, ffn_dim=384)
    state = random_state(args, seed=5)
    return args, state, reference(resident(args, state, "cuda", torch.float16), args, torch.float16)


@pytest.mark.parametrize("n_slots", [2, 3])
@pytest.mark.parametrize("exclusions", [frozenset(), FFN, ATT], ids=["all", "ffn_resident", "att_resident"])
def test_streamed_matches_resident(
    model6: tuple, exclusions: frozenset, n_slots: int, closing: list[OffloadedModel]
) -> None:
    args, state, (ref_tokens, ref_logits) = model6
    model, off = offloaded(args, state, gpu_config(exclusions=exclusions, n_slots=n_slots))
    closing.append(off)
    assert off.store.pinned and off.streaming is not None and off.streaming.n_slots == n_slots
    tokens, logits = greedy(model, PROMPT, STEPS, "cuda", torch.float16)
    assert tokens == ref_tokens
    assert torch.equal(logits, ref_logits)


def test_sequential_reference_matches_ring(model6: tuple, closing: list[OffloadedModel]) -> None:
    args, state, (ref_tokens, ref_logits) = model6
    model, off = offloaded(args, state, gpu_config(exclusions=frozenset(), sequential=True))
    closing.append(off)
    tokens, logits = greedy(model, PROMPT, STEPS, "cuda", torch.float16)
    assert tokens == ref_tokens and torch.equal(logits, ref_logits)


def test_planned_budget_and_replan(model6: tuple, closing: list[OffloadedModel]) -> None:
    args, state, (ref_tokens, ref_logits) = model6
    model, off = offloaded(args, state, gpu_config(exclusions=frozenset()))
    closing.append(off)
    fp = off.plan.footprint
    planned = plan_placement(fp, off.plan.gpu_bytes + 2 * fp.block_bytes, 2, budget_given=True)
    assert planned.streamed_bytes < off.plan.streamed_bytes
    for plan in (planned, plan_placement(fp, None, 3, FFN), plan_placement(fp, None, 2, frozenset())):
        off.replan(plan)
        tokens, logits = greedy(model, PROMPT, STEPS, "cuda", torch.float16)
        assert tokens == ref_tokens and torch.equal(logits, ref_logits)


def test_peak_memory_is_slots_head_cache(closing: list[OffloadedModel]) -> None:
    # 8 blocks of ~14 MiB: streaming keeps only the ring on the GPU.
    args = tiny_args(n_layers=8, dim=1024, n_heads=8, ffn_dim=1024, vocab_size=512, max_seq_len=128)
    state = random_state(args, seed=6)
    cudnn_before = torch.backends.cuda.cudnn_sdp_enabled()
    base = torch.cuda.memory_allocated()
    model, off = offloaded(args, state, gpu_config(exclusions=frozenset()))
    closing.append(off)
    torch.cuda.reset_peak_memory_stats()  # after loading: its link probe is transient
    greedy(model, PROMPT, 8, "cuda", torch.float16)
    peak = torch.cuda.max_memory_allocated() - base
    fp = off.plan.footprint
    expected = off.plan.ring_bytes + fp.head_bytes + fp.kv_cache_bytes + fp.fixed_bytes + 8 * fp.block_other_bytes
    assert peak <= expected + 32 * 2**20
    assert peak < fp.n_blocks * fp.block_bytes  # less than the weights themselves
    assert not torch.backends.cuda.cudnn_sdp_enabled()  # cuDNN attention blocks the host: off while streaming
    off.close()
    assert torch.backends.cuda.cudnn_sdp_enabled() == cudnn_before  # restored


def test_build_from_checkpoint_on_gpu(tmp_path: Path, closing: list[OffloadedModel]) -> None:
    args = tiny_args(n_layers=3)
    state = make_meta_checkpoint(args, tmp_path, seed=7)
    ref = reference(resident(args, state, "cuda", torch.float16), args, torch.float16)
    model, off = build_offloaded_model(tmp_path, gpu_config(exclusions=FFN))
    closing.append(off)
    tokens, logits = greedy(model, PROMPT, STEPS, "cuda", torch.float16)
    assert tokens == ref[0] and torch.equal(logits, ref[1])


@pytest.mark.parametrize("quant, dtype", [(QuantMode.INT8, torch.float16), (QuantMode.INT4, torch.bfloat16)])
def test_quantized_streaming_matches_quantized_resident(
    quant: str, dtype: torch.dtype, closing: list[OffloadedModel]
) -> None:
    from offload.engine import quantize_block

    args = tiny_args(n_layers=4, dim=256, n_heads=4, ffn_dim=512)
    state = random_state(args, seed=8)
    ref_model = resident(args, state, "cuda", dtype)
    for block in ref_model.layers:
        quantize_block(block.cuda(), quant)
    ref = reference(ref_model, args, dtype)
    model, off = offloaded(args, state, gpu_config(dtype=dtype, exclusions=frozenset(), quant=quant))
    closing.append(off)
    assert off.streamed_bytes == off.plan.streamed_bytes
    tokens, logits = greedy(model, PROMPT, STEPS, "cuda", dtype)
    assert tokens == ref[0] and torch.equal(logits, ref[1])
