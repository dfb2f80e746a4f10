"""Home buffers made ahead from a model's shapes, so that a reader writes each block's tensors where the host
store will keep them: converted straight into the buffer the store then pins, instead of into a temporary
that add_block copies (on the H200 host that copy and its page faults were 0.6-1.1 s of a 7B GGUF's 2 s load).

Each block's buffer holds the tensors of its units (what streams when the whole block does), in the order
and alignment HostStore lays a streamed block out, each in the dtype placement stores it in (floats in the
run's dtype). When the plan streams only part of a block, add_block does not recognise the layout and
copies as before, so the result is the same either way.
"""
from __future__ import annotations

import torch

from offload.host import TensorEntry, block_buffer, lay_out
from offload.layout import ModelLayout
from offload.placement import named_tensors


class BlockBuffers:
    """home(name): the view where a block tensor is to be written, or None for a tensor outside the units."""

    def __init__(self, layout: ModelLayout, dtype: torch.dtype) -> None:
        self._layout = layout
        self._entries: dict[int, tuple[dict[str, TensorEntry], int]] = {}
        for i, block in enumerate(layout.blocks):  # read now: placement changes the blocks while a reader runs
            stored = [(name, torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device="meta"))
                      for name, t in named_tensors(block) if layout.unit_of(name) is not None]
            self._entries[i] = lay_out(stored)
        self._open: dict[int, tuple[torch.Tensor, set[str]]] = {}  # block -> its buffer, names not handed out

    def home(self, name: str) -> torch.Tensor | None:
        """Each name once: the block's buffer is made at its first name and let go of (the views hold it) at
        its last."""
        where = self._layout.block_tensor(name)
        if where is None or where[1] not in self._entries[where[0]][0]:
            return None
        i, inner = where
        entries, size = self._entries[i]
        if i not in self._open:
            self._open[i] = (block_buffer(size), set(entries))
        buffer, left = self._open[i]
        left.discard(inner)
        if not left:
            del self._open[i]
        return entries[inner].view(buffer)
