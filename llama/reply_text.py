"""One reply's text as its tokens arrive one by one: the stops that end it and the pieces it streams.

The rules are the Generator's (llama/generation.py), so a sequence decoded in a batch ends at the same token
with the same text as decoded alone: a stop id ends the reply and is not kept; a stop string ends it and
is cut off with everything after it; text that may be the start of a stop string is held back until the
next tokens decide; the token limit ends it after the token that reaches it.
"""
from __future__ import annotations

from llama.generation import Generation
from llama.stop_strings import find_stop, partial_stop_len
from llama.tokenizer import StreamDecoder, Tokenizer


class ReplyText:
    def __init__(
        self, tokenizer: Tokenizer, result: Generation, stop_ids: set[int], stop_strings: list[str], max_new_tokens: int
    ) -> None:
        self.result = result
        self.stop_ids = stop_ids
        self.stop_strings = [s for s in stop_strings if s]
        self.max_new_tokens = max_new_tokens
        self.decoder = StreamDecoder(tokenizer)
        self.held = ""  # text not yet streamed: it may be the start of a stop string
        self.done = False

    def push(self, token: int) -> str:
        """Take the next token; return the text that became final (maybe ''). Sets `done` when the reply ends."""
        stats = self.result.stats
        if token in self.stop_ids:
            return self._end("eos")
        self.result.token_ids.append(token)
        stats.new_tokens += 1
        self.held += self.decoder.push(token)
        hit = find_stop(self.held, self.stop_strings)
        if hit is not None:
            self.held = self.held[:hit]
            return self._end("stop_string")
        safe = len(self.held) - partial_stop_len(self.held, self.stop_strings)
        piece = ""
        if safe > 0:
            piece, self.held = self.held[:safe], self.held[safe:]
            self.result.text += piece
        if stats.new_tokens >= self.max_new_tokens:
            self._end("length")
        return piece

    def finish(self, reason: str = "interrupted") -> str:
        """End the reply (with `reason` unless it has one); return the text still held back, now final."""
        if not self.result.stats.stop_reason:
            self.result.stats.stop_reason = reason
        self.done = True
        if self.result.stats.stop_reason != "stop_string":
            self.held += self.decoder.flush()
        piece, self.held = self.held, ""
        self.result.text += piece
        return piece

    def _end(self, reason: str) -> str:
        self.result.stats.stop_reason = reason
        self.done = True
        return ""
