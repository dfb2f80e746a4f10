"""A checkpoint's own Jinja chat template, rendered with jinja2 the way transformers renders it.

Where it comes from, first found wins: `chat_template.jinja` beside the model, `chat_template` in its
tokenizer_config.json (a string, or a list of named templates: "default"), or a GGUF's
`tokenizer.chat_template`. Rendering follows transformers' `apply_chat_template`: a sandboxed environment
with trim_blocks and lstrip_blocks, loop controls, `raise_exception`, `strftime_now` and a `tojson` that
keeps non-ASCII; variables `messages` (role/content dicts), `add_generation_prompt`, `bos_token`,
`eos_token` (only those the model has). The rendered text is tokenized with the tokenizer's special
tokens recognised as their ids (transformers tokenizes it the same way).

For the console's KV cache, a follow-up turn is the text the template writes after an assistant reply:
rendered with a placeholder reply, everything after it (the reply's end marker, the user's turn, the
prompt for the next reply). The ids that end a reply are the special tokens that text starts with.
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from llama.chat_format import ChatFormat, Message, _check_role, detect_chat_format, get_chat_format
from llama.errors import UserError
from llama.tokenizer import HFTokenizer, Tokenizer

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
_REPLY = "\u2063REPLY\u2063"  # a placeholder no template alters (invisible separators around a word)


def find_chat_template(model_dir: Path) -> tuple[str, str] | None:
    """(template, the file it came from) from a model directory, or None."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return None
    if (model_dir / TEMPLATE_FILE).is_file():
        return (model_dir / TEMPLATE_FILE).read_text(), str(model_dir / TEMPLATE_FILE)
    path = model_dir / TOKENIZER_CONFIG
    if not path.is_file():
        return None
    try:
        template = json.loads(path.read_text()).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return (template, str(path)) if isinstance(template, str) else None


def token_strings(model_dir: Path, tokenizer: Tokenizer) -> dict[str, str]:
    """bos_token / eos_token as the template sees them: tokenizer_config.json's, else the tokenizer's pieces."""
    path = Path(model_dir) / TOKENIZER_CONFIG
    config = json.loads(path.read_text()) if path.is_file() else {}
    out = {}
    for key, token_id in (("bos_token", tokenizer.bos_id), ("eos_token", tokenizer.eos_id)):
        value = config.get(key, getattr(tokenizer, key, None))
        value = value.get("content") if isinstance(value, dict) else value
        if value is None and token_id is not None:
            value = tokenizer.id_to_piece(token_id)
        if value is not None:
            out[key] = value
    return out


class JinjaChatFormat(ChatFormat):
    """A dialog rendered by the checkpoint's template; --chat_format picks a built-in format instead."""

    name = "template"

    def __init__(self, tokenizer: Tokenizer, template: str, source: str, tokens: dict[str, str]) -> None:
        super().__init__(tokenizer)
        self.source = source
        self.tokens = tokens
        self._template = _compile(template, source)
        names = sorted(tokenizer.special_ids, key=len, reverse=True)
        self._specials = re.compile("|".join(re.escape(n) for n in names)) if names else None

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """The prompt text, exactly as transformers' apply_chat_template(tokenize=False) gives it."""
        for m in messages:
            _check_role(m)
        try:
            return self._template.render(messages=[{"role": m.role, "content": m.content} for m in messages],
                                         add_generation_prompt=add_generation_prompt, **self.tokens)
        except Exception as e:  # jinja2 errors and raise_exception from the template itself
            raise UserError(f"{self.source}: the chat template failed to render ({e})") from None

    def encode_text(self, text: str) -> list[int]:
        """Ids of rendered text: special tokens' strings become their ids, the rest is encoded as text
        (by the tokenizers library itself for tokenizer.json and GGUF tokenizers)."""
        if isinstance(self.tokenizer, HFTokenizer):
            return self.tokenizer.encode_rendered(text)
        ids, start = [], 0
        for m in self._specials.finditer(text) if self._specials else ():
            if m.start() > start:
                ids += self.tokenizer.encode(text[start : m.start()])
            ids.append(self.tokenizer.special_ids[m.group()])
            start = m.end()
        return ids + (self.tokenizer.encode(text[start:]) if start < len(text) else [])

    def encode_dialog(self, messages: list[Message]) -> list[int]:
        return self.encode_text(self.render(messages))

    def encode_followup(self, message: Message) -> list[int]:
        if message.role == "assistant":
            raise UserError("chat: a follow-up message must come from the user, not the assistant")
        return self.encode_text(self._after_reply(message.content, message.role))

    def _after_reply(self, content: str, role: str = "user") -> str:
        dialog = [Message("user", "Hi"), Message("assistant", _REPLY), Message(role, content)]  # type: ignore[arg-type]
        text = self.render(dialog)
        if _REPLY not in text:
            raise UserError(f"{self.source}: the chat template does not write the assistant's replies")
        return text.split(_REPLY, 1)[1]

    def _encode_turn(self, message: Message) -> list[int]:
        raise NotImplementedError("JinjaChatFormat renders whole dialogs")

    @cached_property
    def assistant_end_ids(self) -> list[int]:
        """The special token that opens the text after a reply (<|im_end|>, <|eot_id|>, </s>), if one does."""
        m = self._specials.match(self._after_reply("Hi").lstrip(" ")) if self._specials else None
        return [self.tokenizer.special_ids[m.group()]] if m else []

    @property
    def stop_ids(self) -> set[int]:
        return set(self.assistant_end_ids) | self.tokenizer.stop_ids


def _compile(template: str, source: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise UserError(f"{source}: the chat template is not valid Jinja ({e})") from None


def choose_chat_format(name: str | None, tokenizer: Tokenizer, model_dir: Path,
                       template: tuple[str, str] | None) -> ChatFormat:
    """--chat_format when given; else the checkpoint's template when it has one; else the detected built-in."""
    if name is not None:
        return get_chat_format(name, tokenizer)
    if template is not None:
        return JinjaChatFormat(tokenizer, template[0], template[1], token_strings(model_dir, tokenizer))
    return get_chat_format(detect_chat_format(tokenizer, model_dir), tokenizer)
