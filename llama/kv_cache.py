"""The KV cache: preallocated keys and values for every layer, written in place as tokens arrive."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from llama.config import ModelArgs


class KVCache:
    """Keys and values of all layers, shape (batch, n_kv_heads, max_seq_len, head_dim) each.

    The cache does not know how many positions are valid: the caller passes start_pos, and
    the generation code keeps the count (so a rollback is just a smaller start_pos).
    """

    def __init__(
        self,
        args: ModelArgs,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device | str | Sequence[torch.device] = "cpu",
        batch: int = 1,
    ) -> None:
        """device: one for every layer, or one per layer (a model split across GPUs keeps each beside its block)."""
        shape = (batch, args.n_kv_heads, max_seq_len, args.head_dim)
        self.max_seq_len = max_seq_len
        devices = layer_devices(device, args.n_layers)
        self.keys = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]
        self.values = [torch.zeros(shape, dtype=dtype, device=d) for d in devices]

    @classmethod
    def over(cls, keys: list[torch.Tensor], values: list[torch.Tensor]) -> KVCache:
        """A cache over existing per-layer tensors (batch, n_kv_heads, max_seq_len, head_dim)."""
        cache = cls.__new__(cls)
        cache.keys, cache.values, cache.max_seq_len = keys, values, keys[0].shape[2]
        return cache

    def update(
        self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (batch, n_kv_heads, seqlen, head_dim) at start_pos; return keys/values up to the end."""
        end = start_pos + k.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"KV cache overflow: position {end} > {self.max_seq_len}")
        self.keys[layer][:, :, start_pos:end] = k
        self.values[layer][:, :, start_pos:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def keep(self, start_pos: int, slots: list[int]) -> None:
        """Move the keys/values at `slots` (ascending, each >= start_pos) to start_pos, start_pos + 1, ...

        After a token tree was verified, this keeps its accepted path at consecutive positions.
        """
        if slots == list(range(start_pos, start_pos + len(slots))):
            return
        index = torch.tensor(slots, device=self.keys[0].device)
        end = start_pos + len(slots)
        for layer in self.keys + self.values:
            layer[:, :, start_pos:end] = layer.index_select(2, index.to(layer.device))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def layer_devices(device: torch.device | str | Sequence[torch.device], n_layers: int) -> list[torch.device | str]:
    """One device per layer from one for all or a sequence of n_layers."""
    if isinstance(device, (str, torch.device)):
        return [device] * n_layers
    if len(device) != n_layers:
        raise ValueError(f"KV cache: {len(device)} devices for {n_layers} layers")
    return list(device)
