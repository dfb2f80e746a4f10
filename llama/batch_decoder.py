"""Continuous batching: many sequences decoded together, one forward pass per step for all of them.

While weights stream, a pass for sixteen sequences costs what a pass for one costs, so every step runs
each decoding sequence's next token in one batched forward (each row at its own position, llama/slot_cache.py),
copies the (batch, vocab) logits to the host once, and lets each sequence's own Sampler pick its token.
Sequences join and leave between steps:

    1. retire: ended or cancelled sequences leave; the last decoding one moves into the hole (a swap, so
       the leaving one's keys stay for prefix reuse), keeping the decoding sequences in slots 0..B-1;
    2. admit: the first waiting request (first come, first served) takes a free slot, the one holding the
       longest prefix of its prompt (llama/slot_book.py), when nobody else is prefilling;
    3. prefill: one chunk of that prompt through its slot's one-sequence view, so that a long prompt
       delays the others by one chunk per step; after its last chunk the first token is sampled and the
       sequence joins the batch;
    4. decode: one batched forward for all decoding sequences, then each samples and streams its token
       (a lone sequence takes the Generator's own one-sequence step instead: its CUDA graph, where captured).

Speculation composes by taking turns: when exactly one sequence decodes, nobody prefills or waits, and
the Generator has a Speculator that applies to its sampler, that sequence decodes through the Speculator
(token trees verified on the Generator, whose cache is slot 0: where a lone sequence sits); the moment
another request arrives it goes back to plain batched steps. Greedy replies are the same either way.

One thread drives a BatchDecoder (it is not thread-safe); listeners get text pieces and the end as calls.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import torch

from llama.batch_job import ActiveSequence, EndSink, Job, TextSink
from llama.batch_stats import BatchStats, RecentRate
from llama.generation import GenerationStats, Generator
from llama.slot_book import SlotBook
from llama.slot_cache import SlotKVCache


class BatchDecoder:
    def __init__(self, generator: Generator, cache: SlotKVCache) -> None:
        """generator: the model, tokenizer, context, prefill chunk and Speculator; its cache must be slot 0 of
        `cache` (the lone sequence's speculative path runs there)."""
        if generator.cache.keys[0].data_ptr() != cache.keys[0].data_ptr():
            raise ValueError("the Generator's KV cache must be slot 0 of the batch decoder's")
        self.generator = generator
        self.model = generator.model
        self.cache = cache
        self.slots = SlotBook(cache)
        self.queue: deque[ActiveSequence] = deque()
        self.decoding: list[ActiveSequence] = []  # decoding[i] keeps its keys in slot i
        self.prefilling: ActiveSequence | None = None
        self.rate = RecentRate()
        self.largest_batch = 0  # the most sequences one step decoded together

    @property
    def max_batch(self) -> int:
        return self.cache.slots

    @property
    def waiting(self) -> int:
        return len(self.queue)

    @property
    def running(self) -> int:
        """Sequences prefilling or decoding that have not ended (an ended one leaves at the next step)."""
        return sum(not seq.ended for seq in self.decoding) + (self.prefilling is not None)

    @property
    def idle(self) -> bool:
        return not (self.queue or self.decoding or self.prefilling)

    def stats(self) -> BatchStats:
        return BatchStats(self.max_batch, self.running, self.waiting, self.rate.per_second, self.rate.total)

    def submit(
        self, job: Job, on_text: TextSink | None = None, on_end: EndSink | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> ActiveSequence:
        """Queue `job`; its text pieces go to on_text, its end (None, or the error that ended it) to on_end.
        should_stop() turning true ends it at the next step ("interrupted"; never started if still queued)."""
        ctx = self.generator.max_seq_len
        if not job.prompt:
            raise ValueError("empty prompt")
        if len(job.prompt) >= ctx:
            raise ValueError(f"prompt of {len(job.prompt)} tokens does not fit the context of {ctx}")
        job.result.stats.prompt_tokens = len(job.prompt)
        max_new = min(job.max_new_tokens, ctx - len(job.prompt))
        seq = ActiveSequence(job, self.generator.tokenizer, max_new, on_text, on_end, should_stop)
        self.queue.append(seq)
        return seq

    def step(self) -> None:
        """One round: retire, admit, one prefill chunk, one decode pass (see the module's docstring)."""
        self._retire()
        self._admit()
        if self.prefilling is not None:
            self._prefill()
        if self.decoding:
            self._decode()

    def abort(self, error: BaseException) -> None:
        """End every sequence, waiting or running, with `error`; the slots forget what they held."""
        for seq in [*self.queue, *self.decoding, *([self.prefilling] if self.prefilling else [])]:
            seq.end(error=error)
        self.queue.clear()
        self.decoding.clear()
        self.prefilling = None
        self.slots = SlotBook(self.cache)

    def drain(self) -> None:
        """Step until every submitted job has ended."""
        while not self.idle:
            self.step()

    # -- the phases -----------------------------------------------------------------------------------

    def _retire(self) -> None:
        for i in reversed(range(len(self.decoding))):  # the one moved into slot i was looked at already
            seq = self.decoding[i]
            if not seq.ended and not seq.cancelled:
                continue
            seq.end("interrupted")
            last = len(self.decoding) - 1
            self.slots.swap(i, last)
            self.decoding[i] = self.decoding[last]
            self.decoding[i].slot = i
            self.decoding.pop()
        if self.prefilling is not None and self.prefilling.cancelled:
            self.prefilling.end("interrupted")
            self.prefilling = None

    def _admit(self) -> None:
        for seq in [seq for seq in self.queue if seq.cancelled]:  # a client that left never runs
            self.queue.remove(seq)
            seq.end("interrupted")
        if self.prefilling is not None or not self.queue or len(self.decoding) == self.max_batch:
            return
        seq = self.queue.popleft()
        free = range(len(self.decoding), self.max_batch)  # decoding sequences are in the lowest slots
        seq.slot, seq.prefilled = self.slots.choose(seq.history, free)
        seq.stats.prefilled_tokens = len(seq.history) - seq.prefilled
        self.prefilling = seq

    @torch.inference_mode()
    def _prefill(self) -> None:
        seq = self.prefilling
        assert seq is not None
        prompt, start = seq.job.prompt, seq.prefilled
        chunk = prompt[start : start + self.generator.prefill_chunk]
        begin = time.perf_counter()
        try:
            tokens = torch.tensor([chunk], dtype=torch.long, device=self.generator.device)
            logits = self.model(tokens, start, self.cache.slot(seq.slot), last_only=True)
            last = logits[0, -1].float().cpu() if start + len(chunk) == len(prompt) else None
            self._sync()
        except Exception as e:  # noqa: BLE001 - this request fails, the others go on
            self.slots.set(seq.slot, [])
            self.prefilling = None
            seq.end(error=e)
            return
        self.slots.wrote(seq.slot, start, chunk)
        seq.prefilled = start + len(chunk)
        seq.stats.prefill_seconds += time.perf_counter() - begin
        if last is None:
            return
        self.prefilling = None
        seq.start_decoding()
        self._deliver(seq, lambda: seq.sampler.sample(last, seq.history))
        if not seq.ended:  # it joins the batch; else its slot stays free, holding the prompt
            joined = len(self.decoding)
            self.slots.swap(seq.slot, joined)
            seq.slot = joined
            self.decoding.append(seq)

    def _decode(self) -> None:
        if self._speculates():
            self._speculative_token(self.decoding[0])
            return
        for seq in self.decoding:
            seq.close_speculation()
        begin = time.perf_counter()
        try:
            logits = self._alone_logits(self.decoding[0])[None] if len(self.decoding) == 1 else self._batched_logits()
        except Exception as e:  # noqa: BLE001 - the pass failed for every sequence in it
            for seq in self.decoding:
                self.slots.set(seq.slot, [])
                seq.end(error=e)
            return
        self.largest_batch = max(self.largest_batch, len(self.decoding))
        self.rate.add(len(self.decoding), time.perf_counter() - begin)  # before a delivery can wake its client
        for seq, row in zip(self.decoding, logits):
            seq.stats.decode_passes += 1
            self._deliver(seq, lambda: seq.sampler.sample(row, seq.history))  # noqa: B023 - called at once

    @torch.inference_mode()
    def _batched_logits(self) -> torch.Tensor:
        """Feed each decoding sequence's last token at its own position: (batch, vocab) float32 on the CPU."""
        device = self.generator.device
        tokens = torch.tensor([[seq.history[-1]] for seq in self.decoding], dtype=torch.long, device=device)
        positions = torch.tensor([[len(seq.history) - 1] for seq in self.decoding], device=device)  # (batch, 1)
        step = self.cache.batch(positions, kv_len=max(len(seq.history) for seq in self.decoding))
        logits = self.model(tokens, 0, step, positions=positions, mask=step.mask(self.model.args.sliding_window))
        rows = logits[:, -1].float().cpu()  # (batch, vocab): one copy to the host for the whole step
        for seq in self.decoding:
            self.slots.wrote(seq.slot, len(seq.history) - 1, seq.history[-1:])
        return rows

    def _alone_logits(self, seq: ActiveSequence) -> torch.Tensor:
        """The lone sequence's next-token logits (vocab,) through the Generator's own one-sequence step over
        slot 0 (a captured CUDA graph where it has one): a request served alone decodes exactly as the
        Generator decodes it."""
        gen = self.generator
        gen.cached = list(self.slots.held[0])
        logits = gen.prefill(seq.history, GenerationStats())  # the cache holds all but the last token: one runs
        self.slots.set(0, list(gen.cached))
        return logits

    @staticmethod
    def _deliver(seq: ActiveSequence, choose: Callable[[], int]) -> None:
        """seq takes the token choose() gives; a sampler or listener failure ends this request only."""
        try:
            seq.take(choose())
        except Exception as e:  # noqa: BLE001
            seq.end(error=e)

    # -- speculation for a lone sequence --------------------------------------------------------------

    def _speculates(self) -> bool:
        speculator = self.generator.speculator
        return (
            speculator is not None and len(self.decoding) == 1 and self.prefilling is None and not self.queue
            and speculator.applies(self.decoding[0].sampler)
        )

    def _speculative_token(self, seq: ActiveSequence) -> None:
        """seq's next token from the Speculator, run on the Generator (whose cache is slot 0, seq's slot)."""
        gen = self.generator
        begin = time.perf_counter()
        try:
            if seq.speculation is None:  # a plain pass gives the logits the Speculator starts from
                seq.stats.decode_passes += 1
                logits = self._alone_logits(seq)
                budget = seq.reply.max_new_tokens - seq.stats.new_tokens
                seq.speculation = gen.speculator.tokens(gen, logits, seq.sampler, seq.history, seq.stats, budget)
                seq.stats.speculative = True
            token = next(seq.speculation)
        except Exception as e:  # noqa: BLE001
            self.slots.set(0, [])
            seq.end(error=e)
            return
        # The cache holds at least the history with this token (maybe verified tokens past it: kept too).
        self.slots.set(0, gen.cached[: len(seq.history) + 1])
        self.rate.add(1, time.perf_counter() - begin)  # before a delivery can wake its client
        self._deliver(seq, lambda: token)

    def _sync(self) -> None:
        if self.generator.device.type == "cuda":
            torch.cuda.synchronize(self.generator.device)
