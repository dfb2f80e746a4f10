"""The order of block transfers: a ring of device slots, and a sequential reference.

Index convention: blocks are named by their index in the model; `order` lists the streamed ones in
the order a forward pass runs them, and the ring cycles through that order across forward passes.
The schedules only decide *what* to copy into *which* slot and *when*; a Transfer does the copying
and the waiting (CUDA streams and events, or plain synchronous copies), so the ordering logic runs
and is tested without a GPU.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Protocol


class Transfer(Protocol):
    def copy_in(self, block: int, slot: int) -> None:
        """Start copying the block's home buffer into the slot, once the slot's last `mark_free` has passed;
        the slot counts as filled when the copy lands."""

    def wait_filled(self, slot: int) -> None:
        """Make the compute side wait until the slot's last `copy_in` has landed."""

    def mark_free(self, slot: int) -> None:
        """The compute side has finished reading the slot (work queued so far included)."""


class RingSchedule:
    """Overlapped schedule: while block j computes, blocks j+1 .. j+N-1 are in flight in the other slots,
    and releasing j starts the copy of block j+N into j's slot. The ring wraps across forward passes, so
    the next pass's first blocks are fetched during this pass's last blocks and the output head.
    """

    def __init__(self, order: Sequence[int], n_slots: int, transfer: Transfer) -> None:
        if not order:
            raise ValueError("RingSchedule needs at least one streamed block")
        self.order = list(order)
        self.n_slots = min(n_slots, len(self.order))
        self.transfer = transfer
        self._position = {block: i for i, block in enumerate(self.order)}
        self._in_flight: deque[tuple[int, int]] = deque()  # (block, slot) copies issued, not yet acquired
        self._held: dict[int, int] = {}  # block -> slot, acquired and not yet released

    def prefetch(self, block: int, slot: int) -> None:
        """Issue the copy of `block` into `slot`."""
        self.transfer.copy_in(block, slot)
        self._in_flight.append((block, slot))

    def acquire(self, block: int) -> int:
        """The slot holding `block`, after making the compute side wait for its copy."""
        if not self._in_flight or self._in_flight[0][0] != block:
            self._restart(block)
        _, slot = self._in_flight.popleft()
        self.transfer.wait_filled(slot)
        self._held[block] = slot
        return slot

    def release(self, block: int) -> None:
        """Block has been computed: its slot takes the block N places further along the ring."""
        slot = self._held.pop(block)
        self.transfer.mark_free(slot)
        ahead = self.order[(self._position[block] + self.n_slots) % len(self.order)]
        self.prefetch(ahead, slot)

    def _restart(self, block: int) -> None:
        # First pass, or a pass that did not follow the ring (an exception mid-pass): drop what is in
        # flight and fill every slot again starting at `block`. Slots still held are freed first, so no
        # copy overwrites a slot that queued compute still reads.
        for slot in self._held.values():
            self.transfer.mark_free(slot)
        self._held.clear()
        self._in_flight.clear()
        start = self._position[block]
        for slot in range(self.n_slots):
            self.prefetch(self.order[(start + slot) % len(self.order)], slot)


class SequentialSchedule:
    """Reference schedule, easy to reason about: one slot, each block copied right before it runs."""

    n_slots = 1

    def __init__(self, transfer: Transfer) -> None:
        self.transfer = transfer

    def acquire(self, block: int) -> int:
        self.transfer.copy_in(block, 0)
        self.transfer.wait_filled(0)
        return 0

    def release(self, block: int) -> None:
        self.transfer.mark_free(0)
