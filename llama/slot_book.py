"""What each slot of a SlotKVCache holds, and which free slot a new prompt takes.

Slot s holds the keys of `held[s]` at positions 0..len-1. A sequence that ends leaves its keys where they
are, so a later request that continues it (a chat's next turn) finds them: a new prompt takes the free
slot that shares the longest prefix with it and prefills only the rest; among equals (no shared prefix
at all, most often) the one least recently used, so that recent conversations stay longest.
"""
from __future__ import annotations

from collections.abc import Iterable

from llama.slot_cache import SlotKVCache


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class SlotBook:
    def __init__(self, cache: SlotKVCache) -> None:
        self.cache = cache
        self.held: list[list[int]] = [[] for _ in range(cache.slots)]
        self._last_use = [0] * cache.slots
        self._clock = 0

    def choose(self, prompt: list[int], free: Iterable[int]) -> tuple[int, int]:
        """(slot, reusable positions) for `prompt` among the free slots; at least one prompt token stays to
        run, since its logits start the reply."""
        best = max(free, key=lambda s: (min(common_prefix(self.held[s], prompt), len(prompt) - 1), -self._last_use[s]))
        return best, min(common_prefix(self.held[best], prompt), len(prompt) - 1)

    def wrote(self, slot: int, start: int, tokens: list[int]) -> None:
        """The keys of `tokens` are now at positions start.. of `slot` (what was after them is stale)."""
        held = self.held[slot]
        del held[start:]  # in place: a decode step appends one token to each of a batch of long lists
        held.extend(tokens)
        self.touch(slot)

    def set(self, slot: int, tokens: list[int]) -> None:
        self.held[slot] = tokens
        self.touch(slot)

    def touch(self, slot: int) -> None:
        self._clock += 1
        self._last_use[slot] = self._clock

    def swap(self, a: int, b: int) -> None:
        """Exchange two slots, keys and bookkeeping both."""
        if a == b:
            return
        length = max(len(self.held[a]), len(self.held[b]))
        if length:
            self.cache.swap(a, b, length)
        self.held[a], self.held[b] = self.held[b], self.held[a]
        self._last_use[a], self._last_use[b] = self._last_use[b], self._last_use[a]
