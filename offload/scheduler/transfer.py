"""Transfers: how a slot is filled and how compute waits for it.

CudaTransfer copies on a dedicated stream and orders it against compute with two events per slot
("slot filled", recorded on the copy stream; "slot free", recorded on the compute stream); the CPU never
waits. SyncTransfer copies at once on the caller's side: the CPU path, where device memory is host memory.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

CopyFn = Callable[[int, int], None]  # (block, slot): issue the copies of one block into one slot


class CudaTransfer:
    def __init__(self, copy_fn: CopyFn, n_slots: int, device: torch.device) -> None:
        self.copy_fn = copy_fn
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.filled = [torch.cuda.Event() for _ in range(n_slots)]
        self.free = [torch.cuda.Event() for _ in range(n_slots)]

    def copy_in(self, block: int, slot: int) -> None:
        # Waiting on a never-recorded event is a no-op, so a slot's first fill does not wait.
        self.stream.wait_event(self.free[slot])
        with torch.cuda.stream(self.stream):
            self.copy_fn(block, slot)
        self.filled[slot].record(self.stream)

    def wait_filled(self, slot: int) -> None:
        torch.cuda.current_stream(self.device).wait_event(self.filled[slot])

    def mark_free(self, slot: int) -> None:
        self.free[slot].record(torch.cuda.current_stream(self.device))


class SyncTransfer:
    def __init__(self, copy_fn: CopyFn) -> None:
        self.copy_fn = copy_fn

    def copy_in(self, block: int, slot: int) -> None:
        self.copy_fn(block, slot)

    def wait_filled(self, slot: int) -> None:
        pass  # the copy already happened

    def mark_free(self, slot: int) -> None:
        pass  # compute already happened
