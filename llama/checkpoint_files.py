"""What both checkpoint readers share: a weight read from a file, dropping its file pages, JSON files."""
from __future__ import annotations

import ctypes
import mmap
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from llama.json_file import read_json

__all__ = ["Weight", "read_json", "release_pages", "short_reason"]

# Unmap the pages from this process (its RSS drops) but leave them in the page cache: a file read
# again soon (the next run of the same model) comes from RAM. MADV_PAGEOUT would evict them too.
_MADV_DONTNEED = 4


@dataclass(frozen=True)
class Weight:
    """One tensor of a checkpoint under its canonical (Meta) name, in the checkpoint's dtype.

    mapped: the tensor is a view of the file's memory map (not a copy). A consumer that copies or
    converts it elsewhere calls release() afterwards, so a read-once map does not stay resident.
    """

    name: str
    tensor: torch.Tensor
    file: Path
    mapped: bool

    def release(self) -> None:
        if self.mapped:
            release_pages(self.tensor)


def release_pages(t: torch.Tensor) -> None:
    """Unmap the memory-mapped file pages behind t from this process (whole pages inside its bytes).

    The content is kept: the pages are faulted in again (from the page cache or the file) if touched. A no-op off Linux.
    Meant for file-backed tensors; anonymous memory would be pushed to swap, where there is swap.
    """
    if _libc is None or t.device.type != "cpu" or t.numel() == 0:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _libc.madvise(first, last - first, _MADV_DONTNEED)  # failure only costs memory


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


_libc = _load_libc()


def short_reason(e: BaseException) -> str:
    """The first line of an exception's message, cut to a readable length, for one-line errors."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."
