"""Ranges of the integer command-line flags, and defaults that depend on the machine or the mode.

Sampling settings are checked by SamplingParams; everything else numeric is checked here, before any
model is read, so a bad value is one line naming the flag instead of a traceback deep in torch.
"""
from __future__ import annotations

import os
from typing import Any

from llama.errors import UserError

MAX_THREADS = 1024  # torch accepts far more and crashes later (a million threads segfaults)
CONSOLE_MAX_NEW_TOKENS = 256  # the console's default reply length: small models rarely emit EOS
PROMPT_MAX_NEW_TOKENS = 512  # --prompt's default
MAX_BATCH = 256  # each sequence holds a KV cache slot of the whole context; the step's host work grows with it

# flag -> (least, most or None); None values mean "not given" and are left to their defaults.
INT_RANGES: dict[str, tuple[int, int | None]] = {
    "ctx": (16, None),
    "prefill_chunk": (1, None),
    "prefetch": (1, None),
    "max_new_tokens": (1, None),
    "threads": (1, MAX_THREADS),
    "top_k": (0, None),
    "repetition_window": (0, None),
    "draft_tokens": (2, None),
    "max_batch": (1, MAX_BATCH),
}


def check_int_flags(values: dict[str, Any]) -> None:
    """UserError naming the first flag in INT_RANGES whose value lies outside its range."""
    for flag, (least, most) in INT_RANGES.items():
        value = values.get(flag)
        if value is None:
            continue
        if value < least or (most is not None and value > most):
            rule = f"at least {least}" if most is None else f"in [{least}, {most}]"
            raise UserError(f"--{flag} must be {rule}, got {value}")


def default_threads() -> int:
    """The machine's physical cores (torch's own default counts logical ones on some builds)."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def default_max_new_tokens(console: bool) -> int:
    return CONSOLE_MAX_NEW_TOKENS if console else PROMPT_MAX_NEW_TOKENS
