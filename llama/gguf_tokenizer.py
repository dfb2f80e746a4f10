"""The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata, built with the `tokenizers` library.

Two kinds, as `tokenizer.ggml.model` says:
- `llama` (SentencePiece vocabularies: Llama 1/2, Mistral): BPE over the vocabulary with byte fallback,
  `▁` for spaces and one prepended to the text (Metaspace, "first"). The file lists pieces and scores but
  no merges: a merge (a, b) exists for every piece a + b whose halves are pieces, ranked by the piece's
  score (higher first), which is how SentencePiece's BPE picks merges.
- `gpt2` (byte-level BPE: Llama 3, Qwen2): the pieces (already in the byte alphabet) and the file's merges,
  text split first by the regex `tokenizer.ggml.pre` names.
Token types (1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte): controls become special added
tokens, user-defined ones plain added tokens, as transformers' GGUF converter does, so ids agree with it.
BOS is added only if `tokenizer.ggml.add_bos_token` says so (default: yes for `llama`, no for `gpt2`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from llama.errors import UserError
from llama.tokenizer import LLAMA3_SPLIT_PATTERN, HFTokenizer

CONTROL, USER_DEFINED = 3, 4
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_PATTERNS = {"llama-bpe": LLAMA3_SPLIT_PATTERN, "llama3": LLAMA3_SPLIT_PATTERN, "qwen2": QWEN2_SPLIT_PATTERN}


def score_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a scored vocabulary: (a, b) for each piece a + b with both halves in it, best
    piece first (ties: longer left half, then longer right half, then vocabulary order)."""
    ids = {t: i for i, t in enumerate(tokens)}
    found = []
    for piece, score in zip(tokens, scores):
        splits = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in ids and piece[i:] in ids]
        splits.sort(key=lambda ab: (ids[ab[0]], ids[ab[1]]))
        found += [(-score, -len(a), -len(b), a, b) for a, b in splits]
    found.sort(key=lambda m: m[:3])  # stable: equal keys keep vocabulary order
    return [(a, b) for *_, a, b in found]


def build_backend(meta: dict[str, Any], source: Path) -> Any:
    """A tokenizers.Tokenizer from GGUF metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise UserError(f"{source}: GGUF metadata has no tokenizer.ggml.tokens; give a tokenizer file")
    vocab = {t: i for i, t in enumerate(tokens)}
    if kind == "llama":
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = meta.get("tokenizer.ggml.unknown_token_id")
        tok = Tokenizer(models.BPE(vocab, score_merges(tokens, scores), unk_token=None if unk is None else
                                   tokens[unk], fuse_unk=True, byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    elif kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or ()]
        tok = Tokenizer(models.BPE(vocab, merges))
        split = SPLIT_PATTERNS.get(meta.get("tokenizer.ggml.pre", "default"))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
        tok.pre_tokenizer = byte_level if split is None else pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level])
        tok.decoder = decoders.ByteLevel()
    else:
        raise UserError(f"{source}: tokenizer.ggml.model {kind!r} is not supported (supported: llama, gpt2)")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, k in zip(tokens, types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    return tok


class GGUFTokenizer(HFTokenizer):
    """An HF-style tokenizer built from a GGUF's metadata instead of a tokenizer.json."""

    def __init__(self, meta: dict[str, Any], source: Path) -> None:
        # Not HFTokenizer.__init__, which reads tokenizer.json and its config files; the rest is shared.
        self._tok = build_backend(meta, source)
        self._tok.encode_special_tokens = True
        self.vocab_size = len(meta["tokenizer.ggml.tokens"])
        self.special_ids = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
        kind = meta["tokenizer.ggml.model"]
        bos = meta.get("tokenizer.ggml.bos_token_id")
        eos = meta.get("tokenizer.ggml.eos_token_id")
        if eos is None:
            raise UserError(f"{source}: GGUF metadata has no tokenizer.ggml.eos_token_id")
        self.bos_token = None if bos is None else self._tok.id_to_token(bos)
        self.eos_token = self._tok.id_to_token(eos)
        self.add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
        self.bos_id = bos if self.add_bos else None
        self.eos_id = int(eos)
        eot = meta.get("tokenizer.ggml.eot_token_id")
        self.stop_ids = {self.eos_id} | ({int(eot)} if eot is not None else set())

    def backend_json(self) -> str:
        """The tokenizer as a tokenizer.json (what --save_quantized writes beside a converted GGUF)."""
        return self._tok.to_str()
