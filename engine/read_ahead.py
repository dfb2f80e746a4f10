"""Run an iterator a few items ahead in a thread, so that producing items (reading and converting weights)
overlaps with consuming them (copying them into the host store and pinning it).

Torch's and the file reader's work releases the GIL, so the two sides run at the same time; the queue's
bound keeps at most `depth` items in RAM beyond the one being consumed.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


def read_ahead(items: Iterable[T], depth: int = 8) -> Iterator[T]:
    """The items of `items`, in order, produced by a worker thread up to `depth` ahead. An exception in the
    worker is raised here at its place in the order; closing this iterator early stops the worker."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                ready.put((item, None))
        except BaseException as e:  # handed to the consumer, which raises it
            ready.put((_DONE, e))
            return
        ready.put((_DONE, None))

    worker = threading.Thread(target=produce, name="read-ahead", daemon=True)
    worker.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():  # unblock a worker waiting on a full queue
            try:
                ready.get(timeout=0.05)
            except queue.Empty:
                pass
        worker.join()
