"""The edge's translation of offload/'s exceptions into one-line UserErrors that name the flag to change."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from llama.errors import UserError
from offload.errors import BudgetTooSmall, FormatError, MissingDependency, NoGpu, OffloadError, SplitBudgetTooSmall


def flag_message(e: OffloadError) -> str:
    """What the user reads: the library's message plus the flags that would change the outcome."""
    if isinstance(e, SplitBudgetTooSmall):
        where = "--gpu_split" if e.budget_given else "free GPU memory (give --gpu_split to set budgets)"
        return f"{where}: {e}; list more --gpus, lower --ctx or --prefetch, or try --quant int4"
    if isinstance(e, BudgetTooSmall):
        where = "--gpu_mem" if e.budget_given else "free GPU memory (give --gpu_mem to set a budget)"
        return f"{where}: {e}; lower --ctx or --prefetch, drop --offload_exclusion names, or try --quant int4"
    if isinstance(e, NoGpu):
        return f"--use_offload: {e}; drop --use_offload to run on the CPU"
    if isinstance(e, MissingDependency):
        return f"--use_8bit: {e}"
    if isinstance(e, FormatError):
        return f"--quant: {e}"
    return str(e)


@contextmanager
def flag_messages() -> Iterator[None]:
    """Run a library call; an OffloadError leaves it as a UserError naming the flag."""
    try:
        yield
    except OffloadError as e:
        raise UserError(flag_message(e)) from None
