"""A KV cache for many sequences at once, each in its own slot with its own length.

Slot s holds one sequence's keys and values, (n_kv_heads, capacity, head_dim) per layer. A batched step
runs the sequences of slots 0..B-1 together (the caller keeps the running sequences in the lowest slots,
moving one down when another leaves), each row writing at its own positions; every row attends over the
same kv_len keys, and a mask hides those beyond each row's own length.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from llama.config import ModelArgs
from llama.kv_cache import KVCache, layer_devices
from llama.tree_rows import TreeRows


class SlotKVCache:
    def __init__(
        self, args: ModelArgs, slots: int, capacity: int, dtype: torch.dtype,
        device: torch.device | str | Sequence[torch.device] = "cpu",
    ) -> None:
        """device: one for every layer, or one per layer (as KVCache takes it)."""
        shape = (slots, args.n_kv_heads, capacity, args.head_dim)
        self.slots, self.capacity = slots, capacity
        devices = layer_devices(device, args.n_layers)
        self.keys = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.values = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]

    def slot(self, s: int) -> KVCache:
        """Slot s as a one-sequence KVCache (views, no copies): prefill and speculation run through it."""
        return KVCache.over([k[s : s + 1] for k in self.keys], [v[s : s + 1] for v in self.values])

    def batch(self, positions: torch.Tensor, kv_len: int) -> BatchStep:
        """A step for slots 0..B-1, row b's tokens at positions[b] (B, seqlen), attending over kv_len keys."""
        if kv_len > self.capacity:
            raise ValueError(f"KV cache overflow: position {kv_len} > {self.capacity}")
        return BatchStep(self, positions, kv_len)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of slot src into slot dst."""
        for layer in self.keys + self.values:
            layer[dst, :, :length] = layer[src, :, :length]

    def swap(self, a: int, b: int, length: int) -> None:
        """Exchange the first `length` positions of slots a and b (a leaving sequence keeps its keys for reuse)."""
        for layer in self.keys + self.values:
            layer[[a, b], :, :length] = layer[[b, a], :, :length]  # the right side is a copy: a safe exchange

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class BatchStep:
    """What the model's attention calls for one batched forward: update() as KVCache has it."""

    def __init__(self, cache: SlotKVCache, positions: torch.Tensor, kv_len: int) -> None:
        self.cache, self.positions, self.kv_len = cache, positions, kv_len
        self.tree_rows: TreeRows | None = None  # set for an exact tree's pass (llama/tree_rows.py)
        self.rows = torch.arange(positions.shape[0], device=positions.device)[:, None]  # (B, 1)
        self._indices = {positions.device: (self.rows, positions)}  # per device of the layers: (rows, positions)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's whole keys and values (slots, n_kv_heads, capacity, head_dim) and the positions (B, seqlen)
        on their device: where a fused kernel writes this step's keys and values."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        if keys.device not in self._indices:  # a layer on another GPU of a split model
            self._indices[keys.device] = (self.rows.to(keys.device), self.positions.to(keys.device))
        return keys, values, self._indices[keys.device][1]

    def stored(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, n_kv_heads, kv_len, head_dim) of slots 0..B-1: what this step attends over."""
        batch = self.positions.shape[0]
        return self.cache.keys[layer][:batch, :, : self.kv_len], self.cache.values[layer][:batch, :, : self.kv_len]

    def update(
        self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv_heads, seqlen, head_dim) at each row's positions; return (B, n_kv_heads, kv_len,
        head_dim) of slots 0..B-1. start_pos is unused: the positions say where each row goes."""
        keys, values, positions = self.layer(layer)
        rows = self._indices[keys.device][0]
        # Indexing (slot, :, position) with (B, 1) and (B, seqlen) puts (B, seqlen) first: (B, seqlen, heads, dim).
        keys[rows, :, positions] = k.transpose(1, 2)
        values[rows, :, positions] = v.transpose(1, 2)
        return self.stored(layer)

    def mask(self, window: int | None = None) -> torch.Tensor:
        """(B, seqlen, kv_len) bool: the query at position p sees keys at positions (p - window, p]."""
        keys = torch.arange(self.kv_len, device=self.positions.device)
        query = self.positions[:, :, None]  # (B, seqlen, 1)
        visible = keys <= query
        if window is not None:
            visible &= keys > query - window
        return visible
