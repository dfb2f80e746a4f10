"""Exclusion lists, sizes and the VRAM planner (no GPU needed)."""
from __future__ import annotations

import pytest
import torch

from llama.config import ModelArgs
from engine.flag_values import parse_exclusions, parse_size
from engine.offload_messages import flag_message
from llama.errors import UserError
from offload.errors import BudgetTooSmall
from offload.policy import (
    STREAMABLE,
    Footprint,
    OffloadConfig,
    Plan,
    activation_bytes,
    format_bytes,
    plan_placement,
    unit_of,
)

GiB, MiB = 2**30, 2**20


def llama7b_footprint(kv_tokens: int = 2048) -> Footprint:
    args = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, ffn_dim=11008)
    e = 2
    units = {u: 4096 * 4096 * e for u in ("wq", "wk", "wv", "wo")} | {u: 4096 * 11008 * e for u in ("w1", "w2", "w3")}
    return Footprint(
        n_blocks=32,
        unit_bytes=units,
        block_other_bytes=2 * 4096 * e,
        head_bytes=32000 * 4096 * e,
        fixed_bytes=4096 * e,
        kv_cache_bytes=args.kv_cache_bytes(kv_tokens, torch.float16),
        activation_bytes=activation_bytes(args, 2048, torch.float16),
    )


@pytest.mark.parametrize(
    "text, names",
    [
        ("[w1,w2,w3]", {"w1", "w2", "w3"}),
        ("w1,w2,w3", {"w1", "w2", "w3"}),
        (" [wq, wk ,wv,wo] ", {"wq", "wk", "wv", "wo"}),
        ("w1 w3", {"w1", "w3"}),
        ("[]", set()),
        ("", set()),
    ],
)
def test_parse_exclusions(text: str, names: set[str]) -> None:
    assert parse_exclusions(text) == frozenset(names)


def test_unknown_exclusion_lists_valid_names() -> None:
    with pytest.raises(UserError) as e:
        parse_exclusions("[w1,w4]")
    msg = str(e.value)
    assert "'w4'" in msg and "--offload_exclusion" in msg
    assert all(n in msg for n in STREAMABLE)


@pytest.mark.parametrize(
    "text, n", [("6GiB", 6 * GiB), ("6000MB", 6 * 10**9), ("1.5G", int(1.5 * GiB)), ("512 MiB", 512 * MiB)]
)
def test_parse_size(text: str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["6", "six GB", "6XB", ""])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UserError, match="--gpu_mem"):
        parse_size(text)


def test_unit_of() -> None:
    assert unit_of("attention.wq.weight") == "wq"
    assert unit_of("attention.wq.bias") == "wq"
    assert unit_of("feed_forward.w2.qweight") == "w2"  # a quantized format's buffer
    assert unit_of("attention_norm.weight") is None


def test_no_budget_keeps_everything_resident() -> None:
    plan = plan_placement(llama7b_footprint(), None, 2)
    assert plan.streamed_bytes == 0 and plan.head_on_gpu


def test_literal_exclusions_stream_exactly_the_rest() -> None:
    fp = llama7b_footprint()
    plan = plan_placement(fp, 80 * GiB, 2, frozenset({"w1", "w2", "w3"}))
    assert plan.literal and plan.n_resident_blocks == 0 and plan.head_on_gpu
    assert plan.streamed_units(0) == {"wq", "wk", "wv", "wo"}
    assert plan.slot_bytes == 4 * 4096 * 4096 * 2
    assert plan.streamed_bytes == 32 * plan.slot_bytes
    off_all = plan_placement(fp, 80 * GiB, 2, frozenset())
    assert off_all.streamed_bytes == 32 * fp.block_bytes - 32 * fp.block_other_bytes
    # Off_ALL: slots + head + KV cache + activations + norms, nothing else.
    assert off_all.gpu_bytes == (
        2 * off_all.slot_bytes + fp.head_bytes + fp.kv_cache_bytes + fp.activation_bytes
        + 32 * fp.block_other_bytes + fp.fixed_bytes
    )


def test_planner_fits_budget_and_streams_less_with_more_memory() -> None:
    fp = llama7b_footprint()
    last = None
    for gib in (3, 4, 6, 8, 10, 12, 14, 16):
        plan = plan_placement(fp, gib * GiB, 2, budget_given=True)
        assert plan.gpu_bytes <= gib * GiB
        if last is not None:
            assert plan.streamed_bytes <= last
        last = plan.streamed_bytes
    assert last == 0  # 16 GiB holds the whole fp16 7B model


def test_planner_beats_fixed_choices_at_their_cost() -> None:
    fp = llama7b_footprint()
    for ex in ({"w1", "w2", "w3"}, {"wq", "wk", "wv", "wo"}, set()):
        fixed = plan_placement(fp, None, 2, frozenset(ex))
        planned = plan_placement(fp, fixed.gpu_bytes, 2, budget_given=True)
        assert planned.streamed_bytes <= fixed.streamed_bytes


def test_forced_units_stay_resident_when_planning() -> None:
    plan = plan_placement(llama7b_footprint(), 5 * GiB, 2, frozenset({"w2"}), budget_given=True)
    assert all("w2" not in plan.streamed_units(i) for i in range(32))
    assert plan.streamed_bytes > 0


def test_budget_below_slots_says_minimum() -> None:
    fp = llama7b_footprint()
    smallest = Plan(fp, frozenset(), 0, False, 2, None)  # everything streamed, head on the CPU
    with pytest.raises(BudgetTooSmall) as e:
        plan_placement(fp, 1 * GiB, 2, budget_given=True)
    assert e.value.needed == smallest.gpu_bytes
    msg = flag_message(e.value)
    assert "--gpu_mem" in msg and "--ctx" in msg and format_bytes(smallest.gpu_bytes) in msg and "slots" in msg
    # That minimum really is enough.
    assert plan_placement(fp, smallest.gpu_bytes, 2, budget_given=True).gpu_bytes <= smallest.gpu_bytes


def test_head_moves_to_cpu_when_tight() -> None:
    fp = llama7b_footprint()
    tight = Plan(fp, frozenset(), 0, False, 2, None).gpu_bytes + MiB
    plan = plan_placement(fp, tight, 2, budget_given=True)
    assert not plan.head_on_gpu


def test_predicted_tokens_per_second() -> None:
    plan = plan_placement(llama7b_footprint(), None, 2, frozenset())
    assert plan.predicted_tps(54.0) == pytest.approx(54e9 / plan.streamed_bytes)
    assert 4.0 < plan.predicted_tps(54.0) < 4.3  # the figure DESIGN.md quotes for this link
    assert "predicted 4.1" in plan.describe(54.0)
    assert plan_placement(llama7b_footprint(), None, 2).predicted_tps(54.0) is None


def test_ring_never_larger_than_streamed_blocks() -> None:
    fp = llama7b_footprint()
    plan = Plan(fp, frozenset(), 31, True, 4, None)  # one streamed block, four slots asked
    assert plan.ring_bytes == plan.slot_bytes


def test_activation_estimate_grows_with_tokens() -> None:
    args = ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, ffn_dim=11008)
    small, big = (activation_bytes(args, n, torch.float16) for n in (1, 2048))
    assert small < 100 * MiB < big < 1 * GiB


def test_config_rejects_zero_slots() -> None:
    with pytest.raises(ValueError, match="device slot"):
        OffloadConfig(n_slots=0)
