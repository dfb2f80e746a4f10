"""Chat prompt formats: llama2 ([INST]), llama3 (headers), chatml (Qwen2) and raw (base models).

Every format encodes a dialog segment by segment (markup, then each message's content on its own), never
tokenizing text across a message boundary. That makes encoding prefix-stable: for any dialog d, reply a
and next message u,

    encode_dialog(d + [assistant a, u]) == encode_dialog(d) + encode_reply(a) + encode_followup(u)

so a KV cache holding the prompt and the reply's ids is reused whole by the next turn, which only
prefills `encode_followup(u)`: the ids that close the reply (`assistant_end_ids`), u's turn and the
prompt for the next reply. (When the model's own reply ids differ from `encode_reply` of their text,
the cache still matches up to the reply.)

`detect_chat_format` rule, first match wins:
  1. the tokenizer has <|start_header_id|> -> llama3; it has <|im_start|> -> chatml;
  2. the model directory has a tokenizer_config.json: its `chat_template` mentions [INST] -> llama2,
     no `chat_template` at all -> raw (a base model);
  3. otherwise llama2 (Meta's Llama 1/2 directories, Mistral).
Force another with --chat_format.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llama.errors import UserError
from llama.tokenizer import Tokenizer

Role = Literal["system", "user", "assistant"]
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


class ChatFormat(ABC):
    """Turns a dialog into the token ids that prompt the assistant's next reply.

    A format defines the ids that open the dialog, each message's ids, and the ids that open a reply;
    an assistant message in a dialog is always `open_reply + encode_reply(content) + assistant_end_ids`.
    """

    name: str

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    def encode_dialog(self, messages: list[Message]) -> list[int]:
        """Token ids of the whole dialog, ending with the prompt for the assistant's reply."""
        for m in messages:
            _check_role(m)
        messages = self._arrange(messages)
        ids = self._open_dialog()
        for m in messages:
            if m.role == "assistant":
                ids += self._open_reply() + self.encode_reply(m.content) + self.assistant_end_ids
            else:
                ids += self._encode_turn(m)
        return ids + self._open_reply()

    def encode_followup(self, message: Message) -> list[int]:
        """Ids that follow a dialog prompt and the reply's ids: close the reply, add `message`, open the next."""
        _check_role(message)
        if message.role == "assistant":
            raise UserError("chat: a follow-up message must come from the user, not the assistant")
        return self.assistant_end_ids + self._encode_turn(message) + self._open_reply()

    def encode_reply(self, content: str) -> list[int]:
        """Ids of an assistant reply's text as it sits in a dialog (without the end markers)."""
        return self.tokenizer.encode(content)

    def _arrange(self, messages: list[Message]) -> list[Message]:
        """The messages as the format lays them out (a hook for checks and merges)."""
        return messages

    def _open_dialog(self) -> list[int]:
        return []

    def _open_reply(self) -> list[int]:
        return []

    @abstractmethod
    def _encode_turn(self, message: Message) -> list[int]:
        """Ids of a system or user message, end markers included."""

    @property
    @abstractmethod
    def assistant_end_ids(self) -> list[int]:
        """Ids that close an assistant reply inside a dialog (after the reply's own tokens)."""

    @property
    @abstractmethod
    def stop_ids(self) -> set[int]:
        """Ids that end the generation of a reply."""

    def _special(self, name: str) -> int:
        if name not in self.tokenizer.special_ids:
            raise UserError(f"--chat_format {self.name}: the tokenizer has no {name} token")
        return self.tokenizer.special_ids[name]


def _check_role(message: Message) -> None:
    if message.role not in ROLES:
        raise UserError(f"chat message role must be one of {', '.join(ROLES)}, got {message.role!r}")


class Llama2ChatFormat(ChatFormat):
    """`BOS [INST] user [/INST] reply EOS` per exchange; the system prompt opens the first user turn.

    Turns must alternate user/assistant (after an optional system message) and end with the user.
    Contents are stripped, as Meta's reference does.
    """

    name = "llama2"

    def _arrange(self, messages: list[Message]) -> list[Message]:
        if messages and messages[0].role == "system":
            if len(messages) < 2 or messages[1].role != "user":
                raise UserError("llama2 chat format: a system message must be followed by a user message")
            first = Message("user", f"<<SYS>>\n{messages[0].content.strip()}\n<</SYS>>\n\n{messages[1].content}")
            messages = [first] + messages[2:]
        for i, m in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if m.role != expected:
                raise UserError(
                    f"llama2 chat format: message {i} must be from the {expected} (turns alternate, user first)"
                )
        if messages and messages[-1].role != "user":
            raise UserError("llama2 chat format: the last message must be from the user")
        return messages

    def encode_followup(self, message: Message) -> list[int]:
        if message.role != "user":
            raise UserError("llama2 chat format: a follow-up message must come from the user")
        return super().encode_followup(message)

    def encode_reply(self, content: str) -> list[int]:
        return self.tokenizer.encode(content.strip())

    def _encode_turn(self, message: Message) -> list[int]:
        return self.tokenizer.encode(f"[INST] {message.content.strip()} [/INST]", bos=True)

    @property
    def assistant_end_ids(self) -> list[int]:
        return [self.tokenizer.eos_id]

    @property
    def stop_ids(self) -> set[int]:
        return set(self.tokenizer.stop_ids)


class Llama3ChatFormat(ChatFormat):
    """`<|begin_of_text|>` then `<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>` per message.

    Contents are stripped, as Meta's reference does.
    """

    name = "llama3"

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(tokenizer)
        self._begin = self._special("<|begin_of_text|>")
        self._start_header = self._special("<|start_header_id|>")
        self._end_header = self._special("<|end_header_id|>")
        self._eot = self._special("<|eot_id|>")

    def _header(self, role: str) -> list[int]:
        return [self._start_header, *self.tokenizer.encode(role), self._end_header, *self.tokenizer.encode("\n\n")]

    def _open_dialog(self) -> list[int]:
        return [self._begin]

    def _open_reply(self) -> list[int]:
        return self._header("assistant")

    def encode_reply(self, content: str) -> list[int]:
        return self.tokenizer.encode(content.strip())

    def _encode_turn(self, message: Message) -> list[int]:
        return self._header(message.role) + self.tokenizer.encode(message.content.strip()) + [self._eot]

    @property
    def assistant_end_ids(self) -> list[int]:
        return [self._eot]

    @property
    def stop_ids(self) -> set[int]:
        return {self._eot} | self.tokenizer.stop_ids


class ChatMLFormat(ChatFormat):
    """`<|im_start|>role\\ncontent<|im_end|>\\n` per message (Qwen2); no BOS."""

    name = "chatml"

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__(tokenizer)
        self._im_start = self._special("<|im_start|>")
        self._im_end = self._special("<|im_end|>")

    def _open_reply(self) -> list[int]:
        return [self._im_start, *self.tokenizer.encode("assistant\n")]

    def _encode_turn(self, message: Message) -> list[int]:
        header = [self._im_start, *self.tokenizer.encode(f"{message.role}\n")]
        return header + self.tokenizer.encode(message.content) + self.assistant_end_ids

    @property
    def assistant_end_ids(self) -> list[int]:
        return [self._im_end, *self.tokenizer.encode("\n")]

    @property
    def stop_ids(self) -> set[int]:
        return {self._im_end} | self.tokenizer.stop_ids


class RawFormat(ChatFormat):
    """BOS (if the model adds one), then each message's text with no markup: the model continues the text."""

    name = "raw"

    def _open_dialog(self) -> list[int]:
        return self.tokenizer.encode("", bos=True)

    def _encode_turn(self, message: Message) -> list[int]:
        return self.tokenizer.encode(message.content)

    @property
    def assistant_end_ids(self) -> list[int]:
        return []

    @property
    def stop_ids(self) -> set[int]:
        return set(self.tokenizer.stop_ids)


CHAT_FORMATS: dict[str, type[ChatFormat]] = {
    f.name: f for f in (Llama2ChatFormat, Llama3ChatFormat, ChatMLFormat, RawFormat)
}


def get_chat_format(name: str, tokenizer: Tokenizer) -> ChatFormat:
    """The chat format called `name` (the --chat_format flag's values) for this tokenizer."""
    if name not in CHAT_FORMATS:
        raise UserError(f"--chat_format: unknown format {name!r} (valid: {', '.join(sorted(CHAT_FORMATS))})")
    return CHAT_FORMATS[name](tokenizer)


def detect_chat_format(tokenizer: Tokenizer, model_dir: Path) -> str:
    """Name of the chat format this model most likely expects (rule in the module docstring)."""
    if "<|start_header_id|>" in tokenizer.special_ids:
        return "llama3"
    if "<|im_start|>" in tokenizer.special_ids:
        return "chatml"
    config_path = Path(model_dir) / "tokenizer_config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{config_path}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise UserError(f"{config_path}: expected a JSON object, found {type(config).__name__}")
        template = config.get("chat_template")
        if template is None:
            return "raw"
        if "[INST]" in str(template):
            return "llama2"
    return "llama2"
