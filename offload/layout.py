"""What offload/ knows of a model: a sequence of blocks with named tensors, and a few top-level tensors.

offload/ never reads a model's own names. An adapter at the program's composition root (for Llama,
engine/llama_offload.py) describes a model with a ModelLayout: its blocks, how each block's tensors group
into the units a plan places (a unit is resident or streamed as a whole), and where each top-level tensor
belongs (the embedding, the output head, or the small tensors that always sit on the GPU).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from torch import nn


class Part(Enum):
    """The role of a top-level tensor, which decides its place in a plan."""

    EMBEDDING = "embedding"  # a lookup table: kept in host RAM, its rows cross the link
    HEAD = "head"  # the output projection: on the GPU, or in host RAM and computed on the CPU
    FIXED = "fixed"  # small (final norm): always on the GPU


@dataclass(frozen=True)
class ModelLayout:
    """A model seen as `root` holding `blocks`, each split into `units` by `unit_of`.

    block_tensor(name) maps a full tensor name to (block index, name inside the block), or None for a
    top-level tensor; top_level maps each top-level tensor name to where its data lands: one or more
    (dotted path inside root, Part) pairs (a tied embedding also fills the head).
    """

    root: nn.Module
    blocks: Sequence[nn.Module]
    units: tuple[str, ...]
    unit_of: Callable[[str], str | None]  # block-relative tensor name -> unit, None for always-resident ones
    block_tensor: Callable[[str], tuple[int, str] | None]
    top_level: Mapping[str, tuple[tuple[str, Part], ...]]
    embedding_module: str  # the submodule of root that a HostEmbedding replaces
