"""Waiting for a quiet moment on a machine shared with other people's processes (Linux /proc/stat)."""
from __future__ import annotations

import time
from pathlib import Path

IDLE_ENOUGH = 0.9  # a second with at least this share of the CPUs idle counts as quiet


def cpu_idle_fraction(seconds: float) -> float:
    """The share of all CPUs' time spent idle over the next `seconds` (Linux /proc/stat)."""
    def idle_and_total() -> tuple[int, int]:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, all

    idle0, total0 = idle_and_total()
    time.sleep(seconds)
    idle1, total1 = idle_and_total()
    return (idle1 - idle0) / max(1, total1 - total0)


def wait_until_idle(limit: float) -> None:
    """On a shared machine: wait (at most `limit` seconds) for a second in which others left the CPUs idle."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and cpu_idle_fraction(1.0) < IDLE_ENOUGH:
        pass
