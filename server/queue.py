"""One engine, many requests: first come, first served, generation in one worker thread.

The Generator is not thread-safe and its KV cache holds one sequence, so requests take turns. An
asyncio.Lock is fair (waiters are woken in the order they arrived), and the turn is handed on by the
worker thread's completion, never by the coroutine that asked for it: a client that goes away cannot free
the engine while its generation is still running. Going away does stop that generation at the next
token (the Generator's should_stop), so the next request in line starts at once.

Shutting down (close()) stops the running generation the same way and refuses every request still in line:
each of them, and the one that was stopped, ends with a 503.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from llama.generation import Generation, Generator
from llama.sampling import Sampler
from server.errors import ApiError

DISCONNECT_POLL_S = 0.1  # how often a running request checks that its client is still there
_END = object()  # sentinel after the last piece


def shutting_down() -> ApiError:
    return ApiError(503, "the server is shutting down")


@dataclass
class Job:
    """One generation to run: what the Generator's stream() needs, plus where its result goes."""

    prompt: list[int]
    sampler: Sampler
    max_new_tokens: int
    stop_ids: set[int] | None = None
    stop_strings: list[str] = field(default_factory=list)
    result: Generation = field(default_factory=Generation)


class EngineQueue:
    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self._turn = asyncio.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._waiting = 0
        self._stops: set[threading.Event] = set()  # one per generation running
        self._closed = False

    @property
    def waiting(self) -> int:
        """How many requests wait for their turn (the one generating is not counted)."""
        return self._waiting

    def close(self) -> None:
        """Stop the running generation at its next token and refuse all requests from now on."""
        self._closed = True
        for stop in self._stops:
            stop.set()

    async def stream(self, job: Job, is_disconnected: Callable[[], Awaitable[bool]]) -> AsyncIterator[str]:
        """Wait for the engine, then yield the text pieces of `job` as the worker produces them.

        Returns at once (yielding nothing) if the client left while queued; job.result then stays empty
        with stop_reason "interrupted". Errors of the generation are re-raised here; after close(), a
        503 ApiError.
        """
        self._waiting += 1
        try:
            await self._turn.acquire()
        finally:
            self._waiting -= 1
        try:
            gone = await is_disconnected()
        except BaseException:
            self._turn.release()
            raise
        if self._closed:
            self._turn.release()
            raise shutting_down()
        if gone:
            self._turn.release()
            job.result.stats.stop_reason = "interrupted"
            return

        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[object] = asyncio.Queue()
        stop = threading.Event()
        self._stops.add(stop)

        def run() -> None:
            try:
                for piece in self.generator.stream(
                    job.prompt, job.sampler, job.max_new_tokens, stop_ids=job.stop_ids,
                    stop_strings=job.stop_strings, result=job.result, should_stop=stop.is_set,
                ):
                    loop.call_soon_threadsafe(pieces.put_nowait, piece)
            finally:
                loop.call_soon_threadsafe(pieces.put_nowait, _END)

        worker = loop.run_in_executor(self._worker, run)
        worker.add_done_callback(lambda _: self._turn.release())
        watcher = asyncio.create_task(_watch(is_disconnected, stop, worker))
        try:
            while (piece := await pieces.get()) is not _END:
                yield piece  # type: ignore[misc]
            await worker  # re-raise what the generation raised
        finally:
            stop.set()  # no-op when done; stops the generation when the consumer was cancelled or closed
            self._stops.discard(stop)
            watcher.cancel()
        if self._closed and job.result.stats.stop_reason == "interrupted":
            raise shutting_down()


async def _watch(is_disconnected: Callable[[], Awaitable[bool]], stop: threading.Event, worker: asyncio.Future) -> None:
    """Set `stop` when the client disconnects while `worker` runs (even if nobody is reading pieces)."""
    while not worker.done():
        await asyncio.sleep(DISCONNECT_POLL_S)
        if await is_disconnected():
            stop.set()
            return
