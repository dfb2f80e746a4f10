"""Prefetch scheduling of streamed blocks: a ring of device slots on a copy stream, and a sequential reference."""
from offload.scheduler.ring import RingSchedule, SequentialSchedule, Transfer
from offload.scheduler.transfer import CudaTransfer, SyncTransfer

__all__ = ["CudaTransfer", "RingSchedule", "SequentialSchedule", "SyncTransfer", "Transfer"]
