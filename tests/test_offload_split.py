"""The split planner over several devices (pure arithmetic: fake devices, budgets and links; no GPU)."""
from __future__ import annotations

import itertools

import pytest
import torch
from test_offload_policy import llama7b_footprint

from engine.offload_messages import flag_message
from offload.errors import BudgetTooSmall, SplitBudgetTooSmall
from offload.layout import Part
from offload.policy import Footprint, Plan, plan_placement
from offload.split import Card, CardPlan, card_footprint, plan_split, seconds_per_token

GiB = 2**30
CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


def host_bytes(plan: Plan) -> int:
    return plan.streamed_bytes + (0 if plan.head_on_gpu else plan.footprint.head_bytes)


@pytest.mark.parametrize("gib", [3, 4, 6, 9, 12, 16])
@pytest.mark.parametrize("exclusions", [None, frozenset({"w2"})])
def test_one_device_plans_as_plan_placement(gib: int, exclusions: frozenset[str] | None) -> None:
    fp = llama7b_footprint()
    try:
        alone = plan_placement(fp, gib * GiB, 2, exclusions, budget_given=True)
    except BudgetTooSmall:
        with pytest.raises(SplitBudgetTooSmall):
            plan_split(fp, [Card(CUDA0, gib * GiB, 25.0)], 2, exclusions, budget_given=True)
        return
    split = plan_split(fp, [Card(CUDA0, gib * GiB, 25.0)], 2, exclusions, budget_given=True)
    (card,) = split.cards
    assert (host_bytes(card.plan), card.plan.gpu_bytes) == (host_bytes(alone), alone.gpu_bytes)
    if alone.streamed_bytes:
        assert split.predicted_tps() == pytest.approx(25e9 / host_bytes(alone))


def test_two_equal_cards_split_evenly_and_beat_one() -> None:
    fp = llama7b_footprint()
    one = plan_split(fp, [Card(CUDA0, 5 * GiB, 25.0)], 2, budget_given=True)
    two = plan_split(fp, [Card(CUDA0, 5 * GiB, 25.0), Card(CUDA1, 5 * GiB, 25.0)], 2, budget_given=True)
    first, last = two.cards
    assert first.first == 0 and last.first == len(first.blocks) and last.blocks[-1] == 31
    assert abs(len(first.blocks) - len(last.blocks)) <= 2
    assert all(c.plan.gpu_bytes <= 5 * GiB for c in two.cards)
    assert two.streamed_bytes < one.streamed_bytes
    # The time is the larger of the busiest link's and what the rings leave exposed.
    exposed = sum(c.plan.streamed_bytes - c.hidden_bytes for c in two.cards) / 25e9
    busiest = max(c.plan.streamed_bytes for c in two.cards) / 25e9
    assert 1 / two.predicted_tps() == pytest.approx(max(exposed, busiest))
    assert two.predicted_tps() / one.predicted_tps() >= 1.8  # 5 GiB each: the goal's budgets for the 7B shape
    assert two.block_devices == (CUDA0,) * len(first.blocks) + (CUDA1,) * len(last.blocks)
    assert two.on_gpu(Part.HEAD) == last.plan.head_on_gpu and not two.on_gpu(Part.EMBEDDING)


def test_larger_budget_takes_more_blocks() -> None:
    fp = llama7b_footprint()
    plan = plan_split(fp, [Card(CUDA0, 4 * GiB, 25.0), Card(CUDA1, 9 * GiB, 25.0)], 2, budget_given=True)
    small, large = plan.cards
    assert len(large.blocks) > len(small.blocks)
    assert small.plan.gpu_bytes <= 4 * GiB and large.plan.gpu_bytes <= 9 * GiB


def test_faster_link_streams_more() -> None:
    fp = llama7b_footprint()
    plan = plan_split(fp, [Card(CUDA0, 4 * GiB, 12.0), Card(CUDA1, 4 * GiB, 48.0)], 2, budget_given=True)
    slow, fast = plan.cards
    assert fast.plan.streamed_bytes > slow.plan.streamed_bytes
    even = plan_split(fp, [Card(CUDA0, 4 * GiB, 12.0), Card(CUDA1, 4 * GiB, 48.0)], 2, budget_given=True,
                      sizes=(16, 16))
    assert plan.predicted_tps() > even.predicted_tps()


def test_literal_exclusions_buy_slots_only_with_a_second_card() -> None:
    """With the resident units fixed, spare memory can only become slots: worth it only while another card works."""
    fp = llama7b_footprint()
    ffn = frozenset({"w1", "w2", "w3"})
    one = plan_split(fp, [Card(CUDA0, 40 * GiB, 25.0)], 2, ffn)
    assert one.cards[0].plan.n_slots == 2  # alone, more slots would only take memory
    two = plan_split(fp, [Card(CUDA0, 40 * GiB, 25.0), Card(CUDA1, 40 * GiB, 25.0)], 2, ffn)
    assert two.literal and sum(c.plan.n_slots for c in two.cards) > 4
    least = tuple(CardPlan(c.card, c.first, Plan(c.plan.footprint, ffn, 0, True, 2, c.plan.budget, True))
                  for c in two.cards)
    assert seconds_per_token(two.cards) < seconds_per_token(least)
    assert all(c.plan.streamed_units(0) == {"wq", "wk", "wv", "wo"} for c in two.cards)


def test_explicit_sizes_are_kept() -> None:
    fp = llama7b_footprint()
    plan = plan_split(fp, [Card(CUDA0, None), Card(CUDA1, None)], 2, sizes=(10, 22))
    assert [len(c.blocks) for c in plan.cards] == [10, 22] and plan.streamed_bytes == 0
    assert plan.predicted_tps() is None  # nothing streams
    with pytest.raises(ValueError, match="sizes"):
        plan_split(fp, [Card(CUDA0, None), Card(CUDA1, None)], 2, sizes=(10, 10))


def test_budgets_too_small_name_the_flag() -> None:
    with pytest.raises(SplitBudgetTooSmall) as e:
        plan_split(llama7b_footprint(), [Card(CUDA0, GiB // 4, 25.0), Card(CUDA1, GiB // 4, 25.0)], 2,
                   budget_given=True)
    message = flag_message(e.value)
    assert message.startswith("--gpu_split:") and "16 blocks need at least" in message


def test_kv_cache_and_head_shares() -> None:
    fp = llama7b_footprint()
    assert card_footprint(fp, 8, last=False).kv_cache_bytes * 4 == fp.kv_cache_bytes
    assert card_footprint(fp, 8, last=False).head_bytes == 0 and card_footprint(fp, 8, last=True).head_bytes


def test_describe_names_each_device() -> None:
    fp = llama7b_footprint()
    text = plan_split(fp, [Card(CUDA0, 5 * GiB, 25.0), Card(CUDA0, 5 * GiB, 25.0)], 2, budget_given=True).describe()
    assert text.count("cuda:0 blocks") == 2 and "predicted" in text and "share one card" in text


def small_footprint() -> Footprint:
    return Footprint(n_blocks=4, unit_bytes={"a": 300, "b": 700}, block_other_bytes=10, head_bytes=500,
                     fixed_bytes=20, kv_cache_bytes=400, activation_bytes=100)


def every_plan(fp: Footprint, budget: int, n_slots: int) -> list[Plan]:
    units = [frozenset(c) for r in range(3) for c in itertools.combinations(fp.unit_bytes, r)]
    plans = [Plan(fp, u, r, head, s, budget) for u in units for r in range(fp.n_blocks + 1)
             for head in ((True, False) if fp.head_bytes else (True,)) for s in range(n_slots, fp.n_blocks + 1)]
    return [p for p in plans if p.gpu_bytes <= budget]


@pytest.mark.parametrize("budgets, links", [((1600, 1600), (1.0, 1.0)), ((1300, 2500), (1.0, 3.0)),
                                            ((2200, 1400), (2.0, 1.0))])
def test_planner_finds_the_fastest_of_every_split_and_plan(budgets: tuple[int, int],
                                                           links: tuple[float, float]) -> None:
    """Exhaustively: every split, every placement of every card (any slots), against the planner's pick."""
    fp = small_footprint()
    cards = [Card(CUDA0, budgets[0], links[0]), Card(CUDA1, budgets[1], links[1])]
    best = min(
        seconds_per_token((CardPlan(cards[0], 0, p0), CardPlan(cards[1], k, p1)))
        for k in range(1, 4)
        for p0 in every_plan(card_footprint(fp, k, last=False), budgets[0], 1)
        for p1 in every_plan(card_footprint(fp, 4 - k, last=True), budgets[1], 1)
    )
    assert seconds_per_token(plan_split(fp, cards, 1, budget_given=True).cards) == pytest.approx(best)
