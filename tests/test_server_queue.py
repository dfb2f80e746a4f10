"""The engine queue without HTTP: requests awaited from asyncio, decoded together by the worker thread; clients
that leave, readers that are cancelled, failures, and shutting down."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from batch_testing import RecordingDecoder, Request, alone, decoder_over
from tiny_model import build_tiny_engine

from llama.batch_job import Job
from server.errors import ApiError
from server.queue import EngineQueue

CTX = 256
TEXTS = ["the cat", "hello world", "once upon a time", "import os", "a b c"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return build_tiny_engine(tmp_path_factory.mktemp("queue"), CTX)


def queue_over(engine, slots: int) -> tuple[EngineQueue, RecordingDecoder]:
    decoder = decoder_over(engine.model, engine.tokenizer, slots, CTX, kind=RecordingDecoder)
    return EngineQueue(decoder), decoder


def requests(engine, n: int, max_new_tokens: int = 8) -> list[Request]:
    return [Request(engine.tokenizer.encode(TEXTS[i], bos=True), max_new_tokens, stop_ids=set()) for i in range(n)]


async def _still_here() -> bool:
    return False


async def collect(queue: EngineQueue, job: Job, is_disconnected: Callable[[], Awaitable[bool]] = _still_here) -> str:
    return "".join([piece async for piece in queue.stream(job, is_disconnected)])


async def until(condition: Callable[[], bool]) -> None:
    """Wait for condition() without blocking the loop (the test's timeout ends a hang)."""
    for _ in range(6000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def test_concurrent_requests_decode_together_and_reply_as_alone(engine):
    queue, decoder = queue_over(engine, slots=4)
    asked = requests(engine, 5)
    jobs = [r.job() for r in asked]

    async def main() -> list[str]:
        decoder.go.clear()  # all of them wait before the first step
        tasks = [asyncio.create_task(collect(queue, job)) for job in jobs]
        await until(lambda: queue.waiting == len(jobs))
        decoder.go.set()
        return await asyncio.gather(*tasks)

    texts = asyncio.run(main())
    assert decoder.largest_batch == 4
    for request, job, text in zip(asked, jobs, texts):
        want = alone(engine.model, engine.tokenizer, request, CTX)
        assert job.result.token_ids == want.token_ids and text == want.text
    queue.close()


def test_a_client_that_leaves_ends_its_sequence_and_the_next_in_line_runs(engine):
    queue, decoder = queue_over(engine, slots=1)
    long_job, next_job = requests(engine, 1, CTX - 16)[0].job(), requests(engine, 2, 4)[1].job()

    async def main() -> None:
        left, seen = asyncio.Event(), asyncio.Event()

        async def gone() -> bool:
            if left.is_set():
                seen.set()
            return left.is_set()

        async def leaver() -> None:
            async for _ in queue.stream(long_job, gone):
                decoder.go.clear()  # no step runs until the watcher saw the client leave
                left.set()  # a reader that keeps the stream open: the watcher, not the reader, notices
                await seen.wait()
                decoder.go.set()
                await asyncio.sleep(60)

        task = asyncio.create_task(leaver())
        await until(lambda: queue.waiting or long_job.result.stats.new_tokens)
        await collect(queue, next_job)
        task.cancel()

    asyncio.run(main())
    assert long_job.result.stats.stop_reason == "interrupted" and long_job.result.stats.new_tokens < CTX // 2
    assert next_job.result.stats.stop_reason == "length"
    assert decoder.admitted == [long_job, next_job]
    queue.close()


def test_a_cancelled_reader_ends_its_sequence(engine):
    queue, decoder = queue_over(engine, slots=1)
    first, second = requests(engine, 1, CTX - 16)[0].job(), requests(engine, 2, 2)[1].job()

    async def main() -> None:
        async def reader() -> None:
            async for _ in queue.stream(first, _still_here):
                pass

        task = asyncio.create_task(reader())
        await until(lambda: first.result.stats.new_tokens > 0)
        decoder.go.clear()  # no step runs until the cancelled reader has stopped its sequence
        task.cancel()  # as Starlette does when a streaming client disconnects
        await until(task.done)
        decoder.go.set()
        await collect(queue, second)

    asyncio.run(main())
    assert first.result.stats.stop_reason == "interrupted" and first.result.stats.new_tokens < CTX // 2
    assert second.result.stats.stop_reason == "length"
    queue.close()


def test_a_request_whose_client_left_while_it_waited_never_runs(engine):
    queue, decoder = queue_over(engine, slots=1)
    running, waiting = requests(engine, 1, 10)[0].job(), requests(engine, 2, 10)[1].job()

    async def main() -> str:
        left, seen = asyncio.Event(), asyncio.Event()

        async def gone() -> bool:
            if left.is_set():
                seen.set()
            return left.is_set()

        decoder.go.clear()
        first = asyncio.create_task(collect(queue, running))
        await until(lambda: queue.waiting == 1)
        second = asyncio.create_task(collect(queue, waiting, gone))
        await until(lambda: queue.waiting == 2)
        left.set()  # its client goes away while it waits
        await seen.wait()
        decoder.go.set()
        await first
        return await second

    assert asyncio.run(main()) == ""
    assert decoder.admitted == [running]
    assert waiting.result.stats.stop_reason == "interrupted" and waiting.result.token_ids == []
    queue.close()


def test_generation_errors_are_raised_to_their_request_only(engine):
    queue, _ = queue_over(engine, slots=2)
    good, bad = (r.job() for r in requests(engine, 2))

    def explode(*_):
        raise RuntimeError("boom")

    bad.sampler.sample = explode  # type: ignore[method-assign]

    async def main() -> list[object]:
        return await asyncio.gather(collect(queue, good), collect(queue, bad), return_exceptions=True)

    text, error = asyncio.run(main())
    assert isinstance(error, RuntimeError) and "boom" in str(error)
    assert isinstance(text, str) and good.result.stats.stop_reason == "length"
    queue.close()


def test_close_ends_running_and_waiting_requests_with_503_and_refuses_new_ones(engine):
    queue, decoder = queue_over(engine, slots=1)
    running, waiting = requests(engine, 1, CTX - 16)[0].job(), requests(engine, 2, 4)[1].job()

    async def main() -> list[object]:
        tasks = [asyncio.create_task(collect(queue, running)), asyncio.create_task(collect(queue, waiting))]
        await until(lambda: running.result.stats.new_tokens > 0 and queue.waiting == 1)
        queue.close()
        out = await asyncio.gather(*tasks, return_exceptions=True)
        late = await asyncio.gather(collect(queue, requests(engine, 3)[2].job()), return_exceptions=True)
        return out + late

    outcomes = asyncio.run(main())
    assert all(isinstance(o, ApiError) and o.status == 503 for o in outcomes), outcomes
    assert running.result.stats.stop_reason == "interrupted" and waiting.result.token_ids == []
    assert decoder.admitted == [running]
