"""Stop strings in streamed text: where one starts, and how much of the tail may still become one.

A reply is streamed piece by piece, so text that could be the start of a stop string is held back until
the next tokens decide; these two functions are the whole rule, shared by every decode loop.
"""
from __future__ import annotations


def find_stop(text: str, stops: list[str]) -> int | None:
    """Index where the earliest stop string starts in text, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def partial_stop_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
