"""The weight formats a linear can be held in: a closed set, parsed once at the edge (imports no torch)."""
from __future__ import annotations

from enum import Enum


class QuantMode(Enum):
    """What a block's linears become. INT8 and INT4 are our formats (they also stream); BNB is bitsandbytes'
    LLM.int8, which only runs resident."""

    INT8 = "int8"
    INT4 = "int4"
    BNB = "bnb"

    @property
    def streams(self) -> bool:
        """Whether the format's tensors can live in host RAM and cross the link."""
        return self is not QuantMode.BNB
