"""One request of the batch decoder (a Job) and the state of its sequence while it waits, prefills and decodes.

A sequence sees only its own things: its Sampler (own seed, own processors with its own history), its stop
ids and strings, its token limit. That is what makes its reply the one it gets decoded alone.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from llama.generation import Generation
from llama.reply_text import ReplyText
from llama.sampling import Sampler
from llama.tokenizer import Tokenizer

TextSink = Callable[[str], None]
EndSink = Callable[[BaseException | None], None]


@dataclass
class Job:
    """What Generator.stream takes, as one request: the prompt, its sampler, limits and stops, and where the
    reply goes (`result`: ids, text and stats, filled in while it decodes). stop_ids None: the tokenizer's."""

    prompt: list[int]
    sampler: Sampler
    max_new_tokens: int
    stop_ids: set[int] | None = None
    stop_strings: list[str] = field(default_factory=list)
    result: Generation = field(default_factory=Generation)


class ActiveSequence:
    """A submitted Job: its history (prompt and reply so far), where its keys live, and its listeners.

    While it decodes, the cache holds every history token but the last, which the next step feeds.
    """

    def __init__(
        self, job: Job, tokenizer: Tokenizer, max_new_tokens: int, on_text: TextSink | None, on_end: EndSink | None,
        should_stop: Callable[[], bool] | None,
    ) -> None:
        self.job = job
        self.sampler = job.sampler
        self.stats = job.result.stats
        stop_ids = job.stop_ids if job.stop_ids is not None else tokenizer.stop_ids
        self.reply = ReplyText(tokenizer, job.result, stop_ids, job.stop_strings, max_new_tokens)
        self.history = list(job.prompt)
        self.slot = -1  # the slot of its keys once admitted
        self.prefilled = 0  # prompt positions whose keys are in the slot
        self.speculation: Iterator[int] | None = None  # its speculative tokens while it decodes alone
        self._on_text, self._on_end, self._should_stop = on_text, on_end, should_stop
        self._decode_start = 0.0
        self.ended = False

    @property
    def cancelled(self) -> bool:
        return self._should_stop is not None and self._should_stop()

    def start_decoding(self) -> None:
        self._decode_start = time.perf_counter()

    def take(self, token: int) -> None:
        """The next token of the reply: stream what became final, end the reply when it says so."""
        piece = self.reply.push(token)
        if token not in self.reply.stop_ids:  # a stop id ends the reply and is not part of it
            self.history.append(token)
        if piece and self._on_text is not None:
            self._on_text(piece)
        if self.reply.done:
            self.end()

    def end(self, reason: str = "interrupted", error: BaseException | None = None) -> None:
        """End the reply once (reason if it has none yet): stream the text held back, then tell the listener."""
        if self.ended:
            return
        self.ended = True
        self.close_speculation()
        if error is None:
            piece = self.reply.finish(reason)
            if piece and self._on_text is not None:
                self._on_text(piece)
        if self.stats.new_tokens and self._decode_start:
            self.stats.decode_seconds = time.perf_counter() - self._decode_start
        if self._on_end is not None:
            self._on_end(error)

    def close_speculation(self) -> None:
        if self.speculation is not None:
            self.speculation.close()
            self.speculation = None
