"""Pinned host "home" buffers: one contiguous byte buffer per block holding that block's streamed tensors.

One buffer per block means one cudaMemcpyAsync per block. Buffers are ordinary CPU allocations of the
exact size, page-locked with cudaHostRegister (torch's pinned allocator rounds sizes up to a power of
two, which would cost up to 2x host RAM). When locking fails the store says so once and carries on with
pageable memory. A reader that knows the layout ahead can write a block's tensors into a `block_buffer`
itself (views made by TensorEntry.view); add_block then keeps that buffer instead of copying.
"""
from __future__ import annotations

import mmap
import sys
import weakref
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

ALIGN = 512  # every tensor starts at a multiple of this many bytes (vector loads, cuBLAS alignment)
PAGE = mmap.PAGESIZE
COPY_CHUNK = 64 * 2**20  # bytes per piece when several threads fill a buffer (page faults run in parallel)


@dataclass(frozen=True)
class FillMethod:
    """How a home buffer is filled. pin_after_fill: copy into pageable memory, then lock it in one
    cudaHostRegister (the default: on the H200, 32 blocks of 404 MB from the page cache filled at
    10.0 GB/s this way against 1.9 GB/s locking the empty buffer first; BENCHMARKS.md);
    threads: how many threads copy (and fault in pages) at once."""

    pin_after_fill: bool = True
    threads: int = 1


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives inside a byte buffer."""

    name: str
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    def view(self, buffer: torch.Tensor, offset: int | None = None) -> torch.Tensor:
        """The tensor as a view of `buffer` (uint8) at `offset` (default: its own)."""
        start = self.offset if offset is None else offset
        return buffer[start : start + self.nbytes].view(self.dtype).view(self.shape)


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def tensor_nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def lay_out(tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[dict[str, TensorEntry], int]:
    """Entries for the tensors packed in order, each aligned; and the buffer size."""
    entries: dict[str, TensorEntry] = {}
    offset = 0
    for name, t in tensors:
        entries[name] = TensorEntry(name, offset, tensor_nbytes(t), tuple(t.shape), t.dtype)
        offset += aligned(tensor_nbytes(t))
    return entries, offset


def merge_runs(entries: Iterable[TensorEntry]) -> list[tuple[int, int]]:
    """(offset, nbytes) byte ranges covering the entries, adjacent ones merged: one copy per range."""
    runs: list[tuple[int, int]] = []
    for e in sorted(entries, key=lambda e: e.offset):
        size = aligned(e.nbytes)
        if runs and runs[-1][0] + runs[-1][1] == e.offset:
            runs[-1] = (runs[-1][0], runs[-1][1] + size)
        else:
            runs.append((e.offset, size))
    return runs


def page_aligned_empty(nbytes: int) -> torch.Tensor:
    """An uninitialized uint8 CPU tensor starting on a page boundary (what cudaHostRegister locks best)."""
    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % PAGE
    return raw[start : start + nbytes]


_BLOCK_BUFFERS: dict[int, weakref.ref] = {}  # id -> storage of each buffer made by block_buffer, while it lives


def block_buffer(nbytes: int) -> torch.Tensor:
    """A page-aligned buffer for one block that a reader fills through TensorEntry.view, laid out as lay_out
    lays the block's streamed tensors out; HostStore.add_block keeps it as that block's home buffer."""
    buffer = page_aligned_empty(nbytes)
    storage = buffer.untyped_storage()  # one Python object for as long as any view of it lives
    _BLOCK_BUFFERS[id(storage)] = weakref.ref(storage, lambda _, key=id(storage): _BLOCK_BUFFERS.pop(key, None))
    return buffer


def filled_block_buffer(tensors: Mapping[str, torch.Tensor], entries: Mapping[str, TensorEntry],
                        size: int) -> torch.Tensor | None:
    """The block_buffer of `size` bytes that already holds every tensor at its entry's offset, or None."""
    first = next(iter(tensors.values()), None)
    if first is None or first.device.type != "cpu":
        return None
    storage = first.untyped_storage()
    ref = _BLOCK_BUFFERS.get(id(storage))
    if ref is None or ref() is not storage:
        return None
    start = first.data_ptr() - next(iter(entries.values())).offset
    for name, t in tensors.items():
        if t.untyped_storage() is not storage or not t.is_contiguous() or t.data_ptr() != start + entries[name].offset:
            return None
    offset = start - storage.data_ptr()
    if start % PAGE or offset + size > storage.nbytes():
        return None
    return torch.empty(0, dtype=torch.uint8).set_(storage, offset, (size,))


def pin_buffer(buffer: torch.Tensor) -> int:
    """Page-lock a CPU tensor's memory in place; returns the CUDA error code (0 on success)."""
    return int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), tensor_nbytes(buffer), 0))


def _unpin_all(buffers: list[torch.Tensor]) -> None:
    for b in buffers:
        torch.cuda.cudart().cudaHostUnregister(b.data_ptr())


def _split(pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(destination, source) pairs cut into flat pieces of about COPY_CHUNK bytes; GPU sources stay whole."""
    out = []
    for dst, src in pieces:
        if src.device.type != "cpu" or not src.is_contiguous():
            out.append((dst, src))
            continue
        flat_dst, flat_src = dst.view(-1), src.view(-1)
        step = max(1, COPY_CHUNK // max(1, src.element_size()))
        out += [(flat_dst[a : a + step], flat_src[a : a + step]) for a in range(0, flat_src.numel(), step)]
    return out


class HostStore:
    """Home buffers of the streamed blocks, filled one block at a time."""

    def __init__(self, pin: bool, fill: FillMethod = FillMethod()) -> None:
        self.pin = pin and torch.cuda.is_available()
        self.fill = fill
        self._pool = ThreadPoolExecutor(fill.threads) if fill.threads > 1 else None
        self.pin_failed = False
        self._buffers: dict[int, torch.Tensor] = {}
        self._entries: dict[int, dict[str, TensorEntry]] = {}
        self._pinned: list[torch.Tensor] = []
        # Unregister before the buffers are freed; the finalizer holds them until then.
        self._finalizer = weakref.finalize(self, _unpin_all, self._pinned)
        self._finalizer.atexit = False

    def add_block(self, index: int, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy a block's tensors (any device, any order) into a new home buffer, in the given order; tensors a
        reader already wrote into a block_buffer laid out this way stay where they are."""
        entries, size = lay_out(tensors.items())
        lock = self.pin and not self.pin_failed
        buffer = filled_block_buffer(tensors, entries, size)
        if buffer is None:
            buffer = page_aligned_empty(size)
            if lock and not self.fill.pin_after_fill:
                self._lock(buffer)
                lock = False
            pieces = [(entries[name].view(buffer), t) for name, t in tensors.items()]
            if self._pool is None:
                for dst, src in pieces:
                    dst.copy_(src)
            else:
                list(self._pool.map(lambda piece: piece[0].copy_(piece[1]), _split(pieces)))
        if lock:
            self._lock(buffer)
        self._buffers[index] = buffer
        self._entries[index] = entries

    def _lock(self, buffer: torch.Tensor) -> None:
        err = pin_buffer(buffer)
        if err == 0:
            self._pinned.append(buffer)
            return
        self.pin_failed = True
        print(
            f"warning: could not pin {format_bytes(tensor_nbytes(buffer))} of host memory (CUDA error {err}; "
            "not enough lockable RAM?). Continuing with pageable memory: host-to-GPU copies from pageable "
            "memory run several times slower (7 vs 55 GB/s measured on an H100, about 8x), and so will "
            "streaming.",
            file=sys.stderr,
        )

    @property
    def blocks(self) -> list[int]:
        return sorted(self._buffers)

    def buffer(self, index: int) -> torch.Tensor:
        return self._buffers[index]

    def entries(self, index: int) -> dict[str, TensorEntry]:
        return self._entries[index]

    def view(self, index: int, name: str) -> torch.Tensor:
        return self._entries[index][name].view(self._buffers[index])

    @property
    def nbytes(self) -> int:
        return sum(tensor_nbytes(b) for b in self._buffers.values())

    @property
    def pinned(self) -> bool:
        """Every buffer is page-locked."""
        return bool(self._buffers) and len(self._pinned) == len(self._buffers)

    def close(self) -> None:
        """Unlock and free the buffers (no copy from them may be in flight)."""
        if self._pool is not None:
            self._pool.shutdown()
        self._finalizer()
        self._pinned.clear()
        self._buffers.clear()
        self._entries.clear()

