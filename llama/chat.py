"""A conversation whose tokens stay in the KV cache between turns.

The session keeps the exact token ids of the dialog (the model's own reply ids, not a re-encoding
of their text), so each turn prefills only the tokens that close the last reply and open the next.
When a turn would overflow the context, the oldest exchanges are dropped and the dialog is
re-encoded from text (a one-time full prefill, announced through `notify`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from llama.chat_format import ChatFormat, Message
from llama.errors import UserError
from llama.generation import Generation, Generator
from llama.sampling import Sampler


@dataclass
class Exchange:
    user: str
    reply_text: str
    reply_ids: list[int]


class ChatSession:
    def __init__(
        self,
        generator: Generator,
        chat_format: ChatFormat,
        system: str | None = None,
        notify: Callable[[str], None] = lambda msg: None,
    ) -> None:
        self.generator = generator
        self.format = chat_format
        self.system = system
        self.notify = notify
        self.exchanges: list[Exchange] = []
        self.ids: list[int] = []  # the dialog so far: prompts and replies, exactly as the cache saw them

    def reset(self) -> None:
        self.exchanges = []
        self.ids = []

    def _messages(self, exchanges: list[Exchange], user: str) -> list[Message]:
        messages = [Message("system", self.system)] if self.system else []
        for ex in exchanges:
            messages += [Message("user", ex.user), Message("assistant", ex.reply_text)]
        return messages + [Message("user", user)]

    def _prompt_for(self, user: str, room: int) -> tuple[list[int], int]:
        """Token ids that ask for the next reply, and how many old exchanges had to go to fit `room`."""
        if self.exchanges:
            ids = self.ids + self.format.encode_followup(Message("user", user))
            if len(ids) <= room:
                return ids, 0
        for dropped in range(len(self.exchanges) + 1):
            ids = self.format.encode_dialog(self._messages(self.exchanges[dropped:], user))
            if len(ids) <= room:
                return ids, dropped
        raise UserError(
            f"the message is {len(ids)} tokens, longer than the context allows ({room} tokens left for a "
            f"prompt out of {self.generator.max_seq_len}); use a larger --ctx or a shorter message"
        )

    def reply(
        self,
        user: str,
        sampler: Sampler,
        max_new_tokens: int,
        result: Generation | None = None,
        stop_strings: tuple[str, ...] = (),
    ) -> Iterator[str]:
        """Stream the reply to `user`. The exchange joins the dialog even if the reply is interrupted."""
        ctx = self.generator.max_seq_len
        reserve = min(max_new_tokens, max(ctx // 4, 1))  # keep room for at least this much reply
        prompt, dropped = self._prompt_for(user, ctx - reserve)
        if dropped:
            self.notify(f"(context full: dropped the oldest {dropped} exchange{'s' * (dropped > 1)})")
        result = result if result is not None else Generation()
        stop_ids = self.format.stop_ids | self.generator.tokenizer.stop_ids
        try:
            yield from self.generator.stream(
                prompt, sampler, max_new_tokens, stop_ids=stop_ids, stop_strings=list(stop_strings), result=result
            )
        except GeneratorExit:  # the caller stopped reading (Ctrl-C between pieces): keep what was said
            self._commit(user, prompt, dropped, result)
            raise
        self._commit(user, prompt, dropped, result)

    def _commit(self, user: str, prompt: list[int], dropped: int, result: Generation) -> None:
        self.exchanges = self.exchanges[dropped:] + [Exchange(user, result.text, list(result.token_ids))]
        self.ids = prompt + result.token_ids
