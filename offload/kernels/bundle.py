"""A quantized weight format is a frozen dataclass whose fields are all plain tensors, listed by name.

The offload engine copies those tensors into pinned host buffers and device slots and rebuilds the format
from same-shaped views with `from_tensors`, so a format holds no other state: sizes such as the group size
are derived from the tensors' shapes.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TypeVar

import torch

B = TypeVar("B", bound="TensorBundle")


class TensorBundle:
    """Mixin for frozen dataclasses made only of tensors."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """The format's tensors by field name, in declaration order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_tensors(cls: type[B], tensors: Mapping[str, torch.Tensor]) -> B:
        """Rebuild the format from a dict such as `tensors()` returns (any device, same shapes and dtypes)."""
        names = [f.name for f in dataclasses.fields(cls)]
        if sorted(tensors) != sorted(names):
            raise ValueError(f"{cls.__name__} needs tensors {names}, got {sorted(tensors)}")
        return cls(**tensors)

    def to(self: B, device: torch.device | str, non_blocking: bool = False) -> B:
        """A copy of the format with every tensor on `device`."""
        moved = {n: t.to(device, non_blocking=non_blocking) for n, t in self.tensors().items()}
        return type(self).from_tensors(moved)

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors().values())).device

    def nbytes(self) -> int:
        """Bytes held by all tensors of the format (what crosses the link when it is streamed)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())
