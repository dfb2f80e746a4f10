"""Shared plumbing for the batch decoder tests: requests that can be made twice (batched and alone), a decoder
over a tiny model, the reply the Generator gives a request alone, and a decoder that records what it did."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llama.batch_decoder import BatchDecoder
from llama.batch_job import Job
from llama.generation import Generation, Generator
from llama.model import Transformer
from llama.sampling import Sampler, SamplingParams
from llama.slot_cache import SlotKVCache
from llama.tokenizer import Tokenizer
from server.sampling_extras import LogitsProcessor, make_sampler

GREEDY = SamplingParams(temperature=0.0, repetition_penalty=1.0)


@dataclass
class Request:
    """One request, as fresh Jobs on demand (a Sampler holds state, so each run gets its own)."""

    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams = GREEDY
    stop_strings: list[str] = field(default_factory=list)
    stop_ids: set[int] | None = None
    processors: tuple[LogitsProcessor, ...] = ()

    def sampler(self) -> Sampler:
        return make_sampler(self.params, self.processors, len(self.prompt))

    def job(self) -> Job:
        return Job(list(self.prompt), self.sampler(), self.max_new_tokens, self.stop_ids, list(self.stop_strings))


def decoder_over(model: Transformer, tokenizer: Tokenizer, slots: int, ctx: int, prefill_chunk: int = 512,
                 kind: type[BatchDecoder] = BatchDecoder) -> Any:
    """A `kind` of BatchDecoder over a float32 CPU cache of `slots` sequences of `ctx` positions."""
    cache = SlotKVCache(model.args, slots, ctx, torch.float32)
    generator = Generator(model, tokenizer, "cpu", ctx, torch.float32, prefill_chunk, cache=cache.slot(0))
    return kind(generator, cache)


def alone(model: Transformer, tokenizer: Tokenizer, request: Request, ctx: int,
          setup: Callable[[Generator], None] | None = None) -> Generation:
    """The request served by itself: a fresh Generator with its own cache."""
    generator = Generator(model, tokenizer, "cpu", ctx, torch.float32)
    if setup is not None:
        setup(generator)
    return generator.generate(request.prompt, request.sampler(), request.max_new_tokens, stop_ids=request.stop_ids,
                              stop_strings=request.stop_strings)


@dataclass
class Listener:
    """Collects what a submitted job streams."""

    pieces: list[str] = field(default_factory=list)
    ends: list[BaseException | None] = field(default_factory=list)

    def submit(self, decoder: BatchDecoder, job: Job, should_stop: Callable[[], bool] | None = None) -> None:
        decoder.submit(job, self.pieces.append, self.ends.append, should_stop)


class RecordingDecoder(BatchDecoder):
    """A BatchDecoder that records every job submitted, the order they were admitted in, and (running, queued)
    after each step. Its steps wait for `go` (set unless a test clears it) and sleep `delay` seconds after."""

    def __init__(self, generator: Generator, cache: SlotKVCache) -> None:
        super().__init__(generator, cache)
        self.jobs: list[Job] = []
        self.admitted: list[Job] = []
        self.loads: list[tuple[int, int]] = []
        self.go = threading.Event()
        self.go.set()
        self.delay = 0.0

    def submit(self, job: Job, *args: Any, **kwargs: Any) -> Any:
        self.jobs.append(job)
        return super().submit(job, *args, **kwargs)

    def step(self) -> None:
        assert self.go.wait(timeout=60), "the test never let the decoder go"
        before = list(self.queue)
        super().step()
        self.admitted += [seq.job for seq in before if seq not in self.queue and not seq.cancelled]
        self.loads.append((self.running, self.waiting))
        time.sleep(self.delay)

    def forget(self) -> None:
        self.jobs.clear()
        self.admitted.clear()
        self.loads.clear()
