"""Several devices: a contiguous range of blocks on each, each range planned as a one-device model is
(offload/policy.py), and the split chosen by the decode time it predicts. Pure arithmetic: no GPU needed.

At batch 1 the devices work one after another (device 0's blocks, then device 1's, ..., then the head on the
last). Each device has its own copy stream and ring, and its ring wraps across passes (offload/scheduler/
ring.py): while the other devices work, a device's slots fill with its first streamed blocks of the next pass;
the rest of its streamed bytes cross while it works itself. With S_d the bytes device d streams per token,
R_d what its slots hold (at most S_d) and L_d its link, the time per token is

    max( max_d S_d / L_d,  sum_d (S_d - R_d) / L_d )

(each link carries its bytes within the period; nobody's work hides the rest), plus the time a head left in
host RAM takes. Compute is not counted: a streamed decode is bound by its links. One device gives S / L.

What follows from it: a device's memory holds resident weights or slots, and moving bytes between the two
leaves S_d - R_d unchanged, so at batch 1 a second device gains through its memory (fewer bytes cross per
token) and its ring hides its own streamed bytes; slots beyond the least pay only where nothing else can use
the memory (exclusions taken literally fix what is resident).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from offload.errors import SplitBudgetTooSmall
from offload.host import format_bytes
from offload.layout import Part
from offload.policy import Footprint, Plan

UNKNOWN_LINK_GBPS = 1.0  # stands in for an unmeasured link when comparing splits (all alike, as on the CPU)


@dataclass(frozen=True)
class Card:
    """One device the blocks may go to: its memory budget (None: unlimited) and measured link."""

    device: torch.device
    budget: int | None
    link_gbps: float | None = None


@dataclass(frozen=True)
class CardPlan:
    """A card's range of blocks, first .. first + plan.footprint.n_blocks - 1, planned as a model of its own
    (the plan numbers the range's blocks from 0)."""

    card: Card
    first: int
    plan: Plan

    @property
    def blocks(self) -> range:
        return range(self.first, self.first + self.plan.footprint.n_blocks)

    @property
    def hidden_bytes(self) -> int:
        """Streamed bytes the ring fetches while the other cards work: what its slots hold."""
        return self.plan.ring_bytes

    @property
    def host_head_bytes(self) -> int:
        return 0 if self.plan.head_on_gpu else self.plan.footprint.head_bytes


def _bytes_per_second(c: CardPlan) -> float:
    return (c.card.link_gbps or UNKNOWN_LINK_GBPS) * 1e9


def link_seconds(cards: Sequence[CardPlan]) -> tuple[float, float]:
    """The two terms of the module docstring's time: the busiest link's seconds and the exposed seconds (what
    no other card's work hides), unknown links taken as UNKNOWN_LINK_GBPS."""
    busiest = max(c.plan.streamed_bytes / _bytes_per_second(c) for c in cards)
    exposed = sum((c.plan.streamed_bytes - c.hidden_bytes) / _bytes_per_second(c) for c in cards)
    return busiest, exposed


def seconds_per_token(cards: Sequence[CardPlan]) -> float:
    """The module docstring's time per token, unknown links taken as UNKNOWN_LINK_GBPS."""
    return max(link_seconds(cards)) + sum(c.host_head_bytes / _bytes_per_second(c) for c in cards)


@dataclass(frozen=True)
class SplitPlan:
    """Where every part lives across the cards: block i on the card whose range holds it, the token embedding in
    host RAM (its rows go to the first card), the head and the final norm with the last card."""

    footprint: Footprint
    cards: tuple[CardPlan, ...]
    literal: bool = False

    def card_of(self, block: int) -> CardPlan:
        return next(c for c in self.cards if block in c.blocks)

    @property
    def block_devices(self) -> tuple[torch.device, ...]:
        return tuple(c.card.device for c in self.cards for _ in c.blocks)

    def streamed_units(self, block: int) -> frozenset[str]:
        card = self.card_of(block)
        return card.plan.streamed_units(block - card.first)

    def on_gpu(self, part: Part) -> bool:
        return self.cards[-1].plan.on_gpu(part)  # the last card holds the head

    @property
    def streamed_bytes(self) -> int:
        return sum(c.plan.streamed_bytes for c in self.cards)

    def prefill_chunk(self, longest: int) -> int:
        """The longest prompt chunk every card's activations hold."""
        return min(c.plan.prefill_chunk(longest) for c in self.cards)

    def predicted_tps(self) -> float | None:
        """Decode tokens/s (batch 1); None when nothing streams or a link is unknown."""
        if not self.streamed_bytes or any(c.card.link_gbps is None for c in self.cards):
            return None
        return 1 / seconds_per_token(self.cards)

    def describe(self) -> str:
        lines = [f"offload plan over {len(self.cards)} devices ({'as given' if self.literal else 'planned'}):"]
        for c in self.cards:
            p = c.plan
            budget = format_bytes(p.budget) if p.budget is not None else "unlimited"
            link = f"link {c.card.link_gbps:.1f} GB/s" if c.card.link_gbps else "link not measured"
            n_stream, n = p.n_streamed_blocks, p.footprint.n_blocks
            what = f"{n - n_stream} whole"
            if n_stream:
                units = ",".join(u for u in p.units if u in p.resident_units) or "none"
                what += (f", {n_stream} streamed through {min(p.n_slots, n_stream)} slots of "
                         f"{format_bytes(p.slot_bytes)} (resident in those: {units}); streams "
                         f"{format_bytes(p.streamed_bytes)} a token, {format_bytes(c.hidden_bytes)} of it while "
                         f"the others work")
            head = ""
            if c is self.cards[-1]:
                head = "; output head: " + ("GPU" if p.head_on_gpu else "host RAM (computed on the CPU)")
            lines.append(f"  {c.card.device} blocks {c.first}-{c.blocks[-1]}: {what}; GPU {format_bytes(p.gpu_bytes)}"
                         f" of {budget}; {link}{head}")
        tps = self.predicted_tps()
        if not self.streamed_bytes:
            lines.append("  streamed per token: nothing (every weight is on a GPU)")
        elif tps is None:
            lines.append(f"  streamed per token: {format_bytes(self.streamed_bytes)} (links not measured)")
        else:
            lines.append(f"  streamed per token: {format_bytes(self.streamed_bytes)} -> predicted {tps:.2f} "
                         "tokens/s (decode, batch 1)")
        if len({c.card.device for c in self.cards}) < len(self.cards):
            lines.append("  (devices listed twice share one card and one link: the prediction assumes separate ones)")
        return "\n".join(lines)


def card_footprint(footprint: Footprint, n_blocks: int, last: bool) -> Footprint:
    """The share of `footprint` a card holding `n_blocks` of its blocks needs: their KV cache, a whole forward's
    activations, the small fixed tensors, and the head only on the last card."""
    kv = -(-footprint.kv_cache_bytes * n_blocks // footprint.n_blocks)
    return replace(footprint, n_blocks=n_blocks, kv_cache_bytes=kv, head_bytes=footprint.head_bytes if last else 0)


def card_candidates(
    footprint: Footprint, budget: int | None, n_slots: int, exclusions: frozenset[str] | None, literal: bool,
) -> list[Plan]:
    """The plans worth comparing for one card's range (`footprint` from card_footprint), each fitting `budget`.

    Planned: for each set of resident units (one per slot size) and head place, the most resident blocks that
    fit, through n_slots slots (more slots raise S and R alike: never faster). Literal exclusions: the given units,
    every block streamed, through n_slots or more slots (the memory nothing else may use)."""
    forced = exclusions or frozenset()
    heads = (True, False) if footprint.head_bytes else (True,)
    if literal:
        plans = [Plan(footprint, forced, 0, head, s, budget, literal=True)
                 for head in heads for s in range(n_slots, max(n_slots, footprint.n_blocks) + 1)]
        return [p for p in plans if budget is None or p.gpu_bytes <= budget]
    plans = []
    for units in _unit_sets_by_slot_size(footprint, forced):
        slot = sum(b for u, b in footprint.unit_bytes.items() if u not in units)
        for head in heads:
            whole = Plan(footprint, units, footprint.n_blocks, head, n_slots, budget)  # nothing streams
            over = whole.gpu_bytes - budget if budget is not None else 0
            if over <= 0:
                plans.append(whole)
                continue
            if not slot:
                continue
            # Streaming m >= n_slots blocks frees (m - n_slots) slots' worth against the all-resident footprint.
            m = n_slots + -(-over // slot)
            if m <= footprint.n_blocks:
                plans.append(Plan(footprint, units, footprint.n_blocks - m, head, n_slots, budget))
    return [p for p in plans if budget is None or p.gpu_bytes <= budget]


def _unit_sets_by_slot_size(footprint: Footprint, forced: frozenset[str]) -> list[frozenset[str]]:
    """Every superset of `forced`, one per distinct streamed size (the fewest resident units for each)."""
    free = [u for u in footprint.unit_bytes if u not in forced]
    by_size: dict[int, frozenset[str]] = {}
    for mask in range(2 ** len(free)):
        units = forced | frozenset(u for i, u in enumerate(free) if mask >> i & 1)
        size = sum(b for u, b in footprint.unit_bytes.items() if u not in units)
        if size not in by_size or len(units) < len(by_size[size]):
            by_size[size] = units
    return list(by_size.values())


def plan_split(
    footprint: Footprint,
    cards: Sequence[Card],
    n_slots: int,
    exclusions: frozenset[str] | None = None,
    budget_given: bool = False,
    sizes: Sequence[int] | None = None,
) -> SplitPlan:
    """The split (blocks per card, in order; `sizes` fixes it) and each card's plan that predict the shortest
    decode time per token within every card's budget. Ties go to the plan that uses less GPU memory.

    Exclusions follow plan_placement's rule: taken literally unless budgets were given. Raises
    SplitBudgetTooSmall when no split fits."""
    n = footprint.n_blocks
    if not cards or len(cards) > n:
        raise ValueError(f"plan_split: {len(cards)} devices for {n} blocks")
    if sizes is not None and (len(sizes) != len(cards) or sum(sizes) != n or min(sizes) < 1):
        raise ValueError(f"plan_split: sizes {list(sizes)} do not split {n} blocks over {len(cards)} devices")
    literal = exclusions is not None and not budget_given
    memo: dict[tuple[int, int], list[Plan]] = {}

    def candidates(d: int, k: int) -> list[Plan]:
        if (d, k) not in memo:
            fp = card_footprint(footprint, k, last=d == len(cards) - 1)
            memo[(d, k)] = card_candidates(fp, cards[d].budget, n_slots, exclusions, literal)
        return memo[(d, k)]

    # Over the cards in order: for each number of blocks placed so far, the partial splits none beats on both
    # the busiest link's seconds and the exposed seconds (the two terms of the time).
    fronts: dict[int, list[tuple[CardPlan, ...]]] = {0: [()]}
    for d, card in enumerate(cards):
        later = len(cards) - d - 1
        grown: dict[int, list[tuple[CardPlan, ...]]] = {}
        for placed, partials in fronts.items():
            sizes_here = [sizes[d]] if sizes is not None else range(1, n - placed - later + 1)
            for k in sizes_here:
                if later == 0 and placed + k != n:
                    continue
                for plan in candidates(d, k):
                    step = CardPlan(card, placed, plan)
                    grown.setdefault(placed + k, []).extend(p + (step,) for p in partials)
        # The last card adds the head's host time, which the two terms leave out: keep every finished split.
        fronts = {placed: _pareto(partials) if later else partials for placed, partials in grown.items()}
    finished = fronts.get(n, [])
    if not finished:
        raise _too_small(footprint, cards, n_slots, exclusions, budget_given)
    best = min(finished, key=lambda s: (seconds_per_token(s), sum(c.plan.gpu_bytes for c in s)))
    return SplitPlan(footprint, _fewest_slots(best, n_slots), literal)


def _fewest_slots(cards: tuple[CardPlan, ...], n_slots: int) -> tuple[CardPlan, ...]:
    """Each card's slots cut down (not below n_slots) while the time per token stays: the pruning kept one of
    the equally fast splits, perhaps with more slots than it needs."""
    best = seconds_per_token(cards)
    cards = list(cards)
    for i, c in enumerate(cards):
        while c.plan.n_slots > n_slots:
            fewer = replace(c, plan=replace(c.plan, n_slots=min(c.plan.n_slots, c.plan.n_streamed_blocks) - 1))
            if seconds_per_token(cards[:i] + [fewer] + cards[i + 1:]) > best * (1 + 1e-12):
                break
            cards[i] = c = fewer
    return tuple(cards)


def _pareto(partials: list[tuple[CardPlan, ...]]) -> list[tuple[CardPlan, ...]]:
    def terms(s: tuple[CardPlan, ...]) -> tuple[float, float, int]:
        return *link_seconds(s), sum(c.plan.gpu_bytes for c in s)

    kept, least_exposed = [], math.inf
    for s in sorted(partials, key=terms):
        exposed = terms(s)[1]
        if exposed < least_exposed:
            kept.append(s)
            least_exposed = exposed
    return kept


def _too_small(
    footprint: Footprint, cards: Sequence[Card], n_slots: int, exclusions: frozenset[str] | None, budget_given: bool,
) -> SplitBudgetTooSmall:
    """The error naming the smallest budget an even split would need on each card."""
    share = -(-footprint.n_blocks // len(cards))
    # Everything streamed but the floor of exclusions, the head in host RAM: the least a share can take.
    smallest = Plan(card_footprint(footprint, share, last=True), exclusions or frozenset(), 0, False, n_slots, None)
    budgets = ", ".join(format_bytes(c.budget) if c.budget is not None else "unlimited" for c in cards)
    what = "the GPU budgets" if budget_given else "free GPU memory"
    return SplitBudgetTooSmall(
        f"{what} ({budgets}) cannot hold {footprint.n_blocks} blocks split over {len(cards)} devices: "
        f"{share} blocks need at least {format_bytes(smallest.gpu_bytes)} on a device "
        f"({min(n_slots, share)} slots x {format_bytes(smallest.slot_bytes)}, KV cache "
        f"{format_bytes(smallest.footprint.kv_cache_bytes)}, activations "
        f"{format_bytes(footprint.activation_bytes)})",
        min(c.budget or 0 for c in cards), smallest.gpu_bytes, budget_given,
    )
