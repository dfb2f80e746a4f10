"""This process's host memory from the kernel's own counters (Linux /proc/self/status), and its peak over a span.

ru_maxrss is no use for a load measured in a child process: Linux carries the parent's high-water mark over
fork and exec, so a parent that wrote the checkpoint first leaves the child's peak at the parent's. VmHWM is
the child's own peak RSS. Page-locked memory is counted apart as well: VmLck (mlock) and VmPin (pages pinned
for devices); a sampling thread keeps their maxima, since neither has a high-water mark of its own.
"""
from __future__ import annotations

import re
import threading
from pathlib import Path

FIELDS = ("VmRSS", "VmHWM", "VmLck", "VmPin", "RssAnon", "RssFile", "RssShmem")


def status_bytes() -> dict[str, int]:
    """The FIELDS of /proc/self/status that the kernel reports, in bytes."""
    text = Path("/proc/self/status").read_text()
    return {f: int(m.group(1)) * 1024 for f in FIELDS if (m := re.search(rf"^{f}:\s+(\d+) kB", text, re.M))}


class PeakSampler:
    """Maxima of every status field, sampled every `interval` seconds while the context is open."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for field, value in status_bytes().items():
            self.peak[field] = max(self.peak.get(field, 0), value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
