"""One engine, many requests: a worker thread runs the batch decoder's steps; routes await their text pieces.

The BatchDecoder (llama/batch_decoder.py) is not thread-safe, so one thread owns it: requests reach it
through an inbox, and each request's pieces come back to its coroutine through an asyncio queue
(call_soon_threadsafe). Requests decode together up to --max_batch; beyond that they wait, first come,
first served. A client that goes away (noticed by polling is_disconnected, or by the reader being
cancelled) ends its sequence at the next step, freeing its slot for the next in line; if it was still
waiting, it never runs.

Shutting down (close()) ends every running sequence at its next step and refuses every waiting request:
each of them ends with a 503, as does every request that arrives later.
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from typing import Any

from llama.batch_decoder import BatchDecoder
from llama.batch_job import EndSink, Job, TextSink
from server.errors import ApiError

DISCONNECT_POLL_S = 0.1  # how often a request checks that its client is still there


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down")


class _End:
    """The item after a request's last piece: None, or the error that ended it."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class EngineQueue:
    def __init__(self, decoder: BatchDecoder) -> None:
        self.decoder = decoder
        self._inbox: deque[tuple[Job, TextSink, EndSink, Callable[[], bool]]] = deque()
        self._wake = threading.Condition()
        self._stops: set[threading.Event] = set()  # one per request not yet ended
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="engine", daemon=True)
        self._worker.start()

    @property
    def waiting(self) -> int:
        """How many requests wait for a slot (those decoding or prefilling are not counted)."""
        return len(self._inbox) + self.decoder.waiting

    def stats(self) -> dict[str, Any]:
        """The decoder's figures (max_batch, running, decode tokens/s, ...), the inbox counted as queued."""
        return {**asdict(self.decoder.stats()), "queued": self.waiting}

    def close(self) -> None:
        """End the running sequences at their next step and refuse all requests from now on."""
        with self._wake:
            self._closed = True
            for stop in self._stops:
                stop.set()
            self._wake.notify()

    async def stream(self, job: Job, is_disconnected: Callable[[], Awaitable[bool]]) -> AsyncIterator[str]:
        """Yield the text pieces of `job` as the decoder produces them.

        A client that left while its request waited gets nothing (job.result stays empty, stop_reason
        "interrupted"). Errors of the generation are re-raised here; after close(), a 503 ApiError.
        """
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[object] = asyncio.Queue()
        stop = threading.Event()

        def send(item: object) -> None:
            try:
                loop.call_soon_threadsafe(pieces.put_nowait, item)
            except RuntimeError:  # the event loop is gone: nobody is reading
                pass

        with self._wake:
            if self._closed:
                raise shutting_down()
            self._stops.add(stop)
            self._inbox.append((job, send, lambda error: send(_End(error)), stop.is_set))
            self._wake.notify()
        watcher = asyncio.create_task(_watch(is_disconnected, stop))
        try:
            while not isinstance(item := await pieces.get(), _End):
                yield item  # type: ignore[misc]
            if item.error is not None:
                raise item.error
        finally:
            stop.set()  # no-op when it ended; ends it at the next step when the reader was cancelled
            with self._wake:
                self._stops.discard(stop)
            watcher.cancel()
        if self._closed and job.result.stats.stop_reason == "interrupted":
            raise shutting_down()

    def _run(self) -> None:
        """The worker: move new requests into the decoder, step while there is work, sleep when there is none."""
        while True:
            with self._wake:
                while not self._inbox and self.decoder.idle and not self._closed:
                    self._wake.wait()
                if self._closed and not self._inbox and self.decoder.idle:
                    return
                while self._inbox:
                    job, on_text, on_end, should_stop = self._inbox.popleft()
                    try:
                        self.decoder.submit(job, on_text, on_end, should_stop)
                    except Exception as e:  # noqa: BLE001 - a job the decoder refuses fails alone
                        on_end(e)
            try:
                self.decoder.step()
            except Exception as e:  # noqa: BLE001 - a step no phase could handle: its batch is in an unknown state
                self.decoder.abort(e)


async def _watch(is_disconnected: Callable[[], Awaitable[bool]], stop: threading.Event) -> None:
    """Set `stop` when the client disconnects (even if nobody is reading pieces); cancelled when the job ends."""
    while not stop.is_set():
        await asyncio.sleep(DISCONNECT_POLL_S)
        if await is_disconnected():
            stop.set()
            return
