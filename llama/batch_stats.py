"""What the batch decoder reports: how many sequences run and wait, and its recent decode rate."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

RATE_STEPS = 64  # the decode rate is measured over this many recent steps


@dataclass(frozen=True)
class BatchStats:
    max_batch: int  # sequences the KV cache has room for
    running: int  # sequences decoding or prefilling now
    queued: int  # requests waiting for a slot (first come, first served)
    decode_tokens_per_s: float  # tokens all sequences together got per second of decoding, recent steps
    decoded_tokens: int  # tokens of decode steps since the start (each reply's first comes from its prefill)


class RecentRate:
    """Tokens per second over the last RATE_STEPS steps, kept as running sums (read from other threads)."""

    def __init__(self, steps: int = RATE_STEPS) -> None:
        self._steps: deque[tuple[int, float]] = deque()
        self._limit = steps
        self._tokens, self._seconds = 0, 0.0
        self.total = 0

    def add(self, tokens: int, seconds: float) -> None:
        self._steps.append((tokens, seconds))
        self._tokens += tokens
        self._seconds += seconds
        self.total += tokens
        if len(self._steps) > self._limit:
            old_tokens, old_seconds = self._steps.popleft()
            self._tokens -= old_tokens
            self._seconds -= old_seconds

    @property
    def per_second(self) -> float:
        return self._tokens / self._seconds if self._seconds > 0 else 0.0
