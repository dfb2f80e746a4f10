"""What offload/ raises. Messages say what is wrong in the library's terms; the program's edge
(engine/user_errors.py) adds the command-line flag a user would change."""
from __future__ import annotations


class OffloadError(Exception):
    """Base of every error offload/ raises on purpose."""


class BudgetTooSmall(OffloadError):
    """No placement fits the GPU budget; `needed` is the smallest that would."""

    def __init__(self, message: str, budget: int, needed: int, budget_given: bool) -> None:
        super().__init__(message)
        self.budget = budget
        self.needed = needed
        self.budget_given = budget_given


class SplitBudgetTooSmall(BudgetTooSmall):
    """No split of the blocks over several devices fits their budgets."""


class NoGpu(OffloadError):
    """Streaming was asked for on a machine with no usable CUDA GPU."""


class WeightMismatch(OffloadError):
    """The weights given do not match the blocks: one missing, unexpected or misshapen."""


class FormatError(OffloadError, ValueError):
    """Tensors that make no known quantized format, or a format that cannot hold this weight."""


class MissingDependency(OffloadError):
    """An optional package a format needs (bitsandbytes) is not installed."""
