"""Tokenizers: SentencePiece (Llama 1/2, Mistral), Llama 3's tiktoken rank file, HF `tokenizer.json`.

All three share one interface, `Tokenizer`. `encode` treats its text as plain text: a special token's
string typed by a user (say "<|eot_id|>") is never turned into the control id; chat formats insert
control ids themselves through `special_ids`. `load_tokenizer` picks the kind from the file's content.
`StreamDecoder` turns ids, one at a time, into printable text.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from llama.errors import UserError
from llama.generation_config import GenerationConfig, read_generation_config

# Llama 3's pre-tokenizer split (the cl100k pattern).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_SPECIAL_TOKENS = 256
# Llama 3.1's named specials in id order from the first id after the ranks (128000); the rest are reserved.
LLAMA3_NAMED_SPECIALS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
)
# tiktoken's regex backtracks badly on very long runs of (non-)whitespace; such runs are cut.
TIKTOKEN_MAX_RUN = 25_000
# Names tried, in order, when an HF tokenizer's config files name no EOS token.
FALLBACK_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>")


class Tokenizer(ABC):
    """Text <-> token ids for one model.

    bos_id is None when the model has no BOS token (Qwen2). add_bos: whether a text the model reads begins
    with BOS (a raw prompt, a perplexity chunk); the checkpoint decides, through tokenizer_config.json's
    `add_bos_token` or, for tokenizer.json, its post-processor. A tokenizer may name a BOS it never adds.
    stop_ids: ids that end generation (always includes eos_id). special_ids: control tokens by name.
    """

    bos_id: int | None
    add_bos: bool
    eos_id: int
    stop_ids: set[int]
    vocab_size: int
    special_ids: dict[str, int]

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, with BOS first and EOS last when asked (BOS only if the model adds one)."""
        ids = self._encode_text(text)
        if bos and self.add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    @abstractmethod
    def _encode_text(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; an incomplete UTF-8 sequence shows as U+FFFD; control tokens as their names
        (SentencePiece controls as nothing)."""

    @abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary entry of one id as the tokenizer stores it ('▁the' for SentencePiece,
        'Ġthe' for byte-level tokenizer.json, ' the' for tiktoken; bytes that are not UTF-8 as '\\xNN')."""


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `tokenizer.model` (Llama 1/2, Mistral)."""

    def __init__(self, path: Path) -> None:
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise UserError(f"{path}: not a valid SentencePiece tokenizer model ({e})") from None
        self.vocab_size = self._sp.vocab_size()
        if self._sp.eos_id() < 0:
            raise UserError(f"{path}: the SentencePiece model defines no EOS token")
        self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self.add_bos = _add_bos_token(path.parent, default=True)  # Llama 1/2 and Mistral begin with BOS
        self.eos_id = self._sp.eos_id()
        self.stop_ids = {self.eos_id}
        self.special_ids = {
            self._sp.id_to_piece(i): i
            for i in range(self.vocab_size)
            if self._sp.is_control(i) or self._sp.is_unknown(i)
        }

    def _encode_text(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)


class TiktokenTokenizer(Tokenizer):
    """Llama 3's `tokenizer.model`: lines of `base64(token bytes) rank`, plus 256 specials after them."""

    def __init__(self, path: Path) -> None:
        import tiktoken

        ranks = read_tiktoken_ranks(path)
        first_special = len(ranks)
        names = list(LLAMA3_NAMED_SPECIALS) + [
            f"<|reserved_special_token_{i}|>"
            for i in range(3, 3 + LLAMA3_NUM_SPECIAL_TOKENS - len(LLAMA3_NAMED_SPECIALS))
        ]
        self.special_ids = {name: first_special + i for i, name in enumerate(names)}
        self._encoding = tiktoken.Encoding(
            name=path.name, pat_str=LLAMA3_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=self.special_ids
        )
        self.vocab_size = first_special + LLAMA3_NUM_SPECIAL_TOKENS
        self.bos_id = self.special_ids["<|begin_of_text|>"]
        self.add_bos = _add_bos_token(path.parent, default=True)
        self.eos_id = self.special_ids["<|end_of_text|>"]
        self.stop_ids = {self.eos_id, self.special_ids["<|eom_id|>"], self.special_ids["<|eot_id|>"]}

    def _encode_text(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in _split_long_runs(text, TIKTOKEN_MAX_RUN):
            ids.extend(self._encoding.encode(piece, allowed_special=set(), disallowed_special=()))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._encoding.decode(list(ids))

    def id_to_piece(self, token_id: int) -> str:
        return self._encoding.decode_single_token_bytes(token_id).decode("utf-8", errors="backslashreplace")


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse a tiktoken rank file; the ranks must be exactly 0..n-1."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise UserError(f"{path}:{lineno}: expected 'base64-token rank', got {line[:60]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise UserError(f"{path}: the ranks of a tiktoken file must be 0..{len(ranks) - 1}, each once")
    return ranks


def _split_long_runs(text: str, limit: int) -> Iterator[str]:
    """Cut `text` inside runs of whitespace or non-whitespace longer than `limit`; elsewhere keep it whole."""
    start = 0
    for run in re.finditer(rf"\s{{{limit + 1},}}|\S{{{limit + 1},}}", text):
        for cut in range(run.start() + limit, run.end(), limit):
            yield text[start:cut]
            start = cut
    yield text[start:]


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`; BOS/EOS/stop ids from the config files beside it.

    bos: tokenizer_config.json `bos_token` (null means none), else config.json `bos_token_id`.
    eos: tokenizer_config.json `eos_token`, else config.json / generation_config.json `eos_token_id`,
    else the first of FALLBACK_EOS_NAMES in the vocabulary. stop_ids: eos plus every `eos_token_id`
    of config.json and generation_config.json.
    """

    def __init__(self, path: Path, generation: GenerationConfig | None = None) -> None:
        """generation: the generation_config.json beside the file, if the caller read it already."""
        from tokenizers import Tokenizer as HFBackend

        try:
            self._tok = HFBackend.from_file(str(path))
        except Exception as e:  # the tokenizers library raises plain Exception on bad JSON
            raise UserError(f"{path}: not a valid tokenizer.json ({e})") from None
        self._tok.encode_special_tokens = True
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.special_ids = {tok.content: i for i, tok in self._tok.get_added_tokens_decoder().items()}
        tokenizer_config = _read_json_if_present(path.parent / "tokenizer_config.json")
        config = _read_json_if_present(path.parent / "config.json")
        generation = generation if generation is not None else read_generation_config(path.parent)
        config_eos = _id_list(config.get("eos_token_id")) + list(generation.eos_ids)

        if "bos_token" in tokenizer_config:
            self.bos_id = self._named_id(tokenizer_config["bos_token"], path.parent / "tokenizer_config.json")
        else:
            self.bos_id = config.get("bos_token_id")
        self.add_bos = _add_bos_token(path.parent, default=self._post_processor_adds(self.bos_id))
        if tokenizer_config.get("eos_token") is not None:
            eos_id = self._named_id(tokenizer_config["eos_token"], path.parent / "tokenizer_config.json")
        elif config_eos:
            eos_id = config_eos[0]
        else:
            eos_id = next((i for n in FALLBACK_EOS_NAMES if (i := self._tok.token_to_id(n)) is not None), None)
        if eos_id is None:
            raise UserError(f"{path}: no EOS token found (tokenizer_config.json / config.json name none)")
        self.eos_id = eos_id
        self.stop_ids = {eos_id, *config_eos}

    def _named_id(self, token: str | dict[str, Any] | None, source: Path) -> int | None:
        """Id of a token given by name (a string or an AddedToken dict, as tokenizer_config.json has it)."""
        if token is None:
            return None
        name = token["content"] if isinstance(token, dict) else token
        token_id = self._tok.token_to_id(name)
        if token_id is None:
            raise UserError(f"{source}: token {name!r} is not in the tokenizer's vocabulary")
        return token_id

    def _post_processor_adds(self, bos_id: int | None) -> bool:
        """Whether tokenizer.json's post-processor puts BOS in front of a text."""
        ids = self._tok.encode("a", add_special_tokens=True).ids
        return bos_id is not None and bool(ids) and ids[0] == bos_id

    def _encode_text(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_rendered(self, text: str) -> list[int]:
        """Ids of chat-template output: special tokens' strings become their ids, and the text between them
        is split exactly as transformers splits it (a SentencePiece-style `▁` only at the very start)."""
        if not hasattr(self, "_rendering"):
            from tokenizers import Tokenizer as HFBackend

            self._rendering = HFBackend.from_str(self._tok.to_str())  # a twin that matches special tokens
            self._rendering.encode_special_tokens = False
        return self._rendering.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id)


def _read_json_if_present(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _add_bos_token(directory: Path, default: bool) -> bool:
    """tokenizer_config.json's add_bos_token beside the tokenizer, else default."""
    path = directory / "tokenizer_config.json"
    value = _read_json_if_present(path).get("add_bos_token")
    if value is None:
        return default
    if not isinstance(value, bool):
        raise UserError(f"{path}: field 'add_bos_token' must be true or false, got {value!r}")
    return value


def _id_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def load_tokenizer(path: Path, generation: GenerationConfig | None = None) -> Tokenizer:
    """Load a tokenizer file, or the one in a directory (tokenizer.model first, then tokenizer.json).

    The kind comes from the content: JSON -> tokenizer.json; lines of 'base64 rank' -> tiktoken;
    anything else must be a SentencePiece protobuf. generation: the directory's generation_config.json,
    when the caller has read it (a tokenizer.json takes extra stop ids from it; otherwise it reads it).
    """
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in ("tokenizer.model", "tokenizer.json") if (path / name).is_file()]
        if not found:
            raise UserError(f"{path}: no tokenizer.model or tokenizer.json in this directory")
        path = found[0]
    elif not path.is_file():
        raise UserError(f"{path}: tokenizer file not found")
    with path.open("rb") as f:
        head = f.read(4096)
    if not head.strip():
        raise UserError(f"{path}: tokenizer file is empty")
    if head.lstrip().startswith(b"{"):
        return HFTokenizer(path, generation)
    if re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+\r?", head.split(b"\n", 1)[0]):
        return TiktokenTokenizer(path)
    return SentencePieceTokenizer(path)


class StreamDecoder:
    """Turns ids, pushed one at a time, into the text they add, ready to print.

    Each push decodes a short window (the previous piece as context, then the new ids) and returns what
    it adds beyond the context's own text. The context keeps SentencePiece's leading-space rule right
    (a lone '▁word' decodes without its space), and text ending in U+FFFD is held back until the rest of
    a multi-byte character arrives. The concatenated output equals `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._context_start = 0  # window start: ids before it no longer affect the new text
        self._emitted_end = 0  # ids before it have been returned as text

    def push(self, token_id: int) -> str:
        """Add one id; return the new printable text (may be '')."""
        self._ids.append(token_id)
        return self._take(hold_incomplete=True)

    def flush(self) -> str:
        """Return any text still held back (an unfinished character comes out as U+FFFD)."""
        return self._take(hold_incomplete=False)

    def _take(self, hold_incomplete: bool) -> str:
        if self._emitted_end == len(self._ids):
            return ""
        context = self._tokenizer.decode(self._ids[self._context_start : self._emitted_end])
        text = self._tokenizer.decode(self._ids[self._context_start :])
        if hold_incomplete and text.endswith("\ufffd"):
            return ""
        self._context_start, self._emitted_end = self._emitted_end, len(self._ids)
        return text[len(context) :]
