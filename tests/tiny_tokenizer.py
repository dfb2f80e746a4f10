"""Tiny tokenizers of all three kinds, built on the fly for tests (each in well under a second).

- `train_tiny_sentencepiece(dir)`: a SentencePiece BPE `tokenizer.model` like Llama 2's
  (byte_fallback, unk 0, bos 1, eos 2, no pad), so any text encodes.
- `write_tiny_tiktoken(dir)`: a Llama 3 style rank file (all 256 bytes plus a few merges).
- `write_tiny_hf_tokenizer(dir)`: a byte-level BPE `tokenizer.json` with Qwen2's chat specials and a
  `tokenizer_config.json` beside it.

Each result is deterministic; the trained bytes are cached for the session, so calling again in another
tmp dir only writes a file.
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

CORPUS = """\
Hello world, this is a tiny corpus for a tiny tokenizer.
The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.
A language model reads tokens and predicts the next token, one at a time.
Café crème brûlée à la carte, naïve façade, jalapeño, São Paulo, Zürich, smörgåsbord.
Numbers like 1234567890 and 3.14159 or 2026 appear in text too.
User: what is the capital of France? Assistant: the capital of France is Paris.
You are a helpful assistant. Answer the question briefly and politely.
[INST] Tell me a story about a dragon. [/INST] Once upon a time there was a dragon.
system user assistant hello there how are you today thank you very much
"""

HF_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Merges for the tiny tiktoken file; each one's halves are earlier tokens, as BPE requires.
TIKTOKEN_MERGES = (b"th", b"he", b"the", b" the", b"in", b"er", b"an", b" a", b"ll", b"llo", b"hello", b"\n\n")

_sentencepiece_cache: dict[int, bytes] = {}
_hf_cache: dict[int, str] = {}


def train_tiny_sentencepiece(directory: Path, vocab_size: int = 400) -> Path:
    """Write a tiny SentencePiece BPE model to `directory/tokenizer.model` and return its path.

    vocab_size must leave room for the 256 byte pieces, 3 controls and the corpus' characters (>= 330).
    """
    import sentencepiece as spm

    if vocab_size not in _sentencepiece_cache:
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(CORPUS.splitlines()), model_writer=model, model_type="bpe",
            vocab_size=vocab_size, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
            split_digits=True,
            num_threads=1, minloglevel=2,
        )
        _sentencepiece_cache[vocab_size] = model.getvalue()
    path = Path(directory) / "tokenizer.model"
    path.write_bytes(_sentencepiece_cache[vocab_size])
    return path


def write_tiny_tiktoken(directory: Path) -> Path:
    """Write a Llama 3 style rank file (`base64 rank` per line) to `directory/tokenizer.model`.

    Ranks 0..255 are the single bytes, then TIKTOKEN_MERGES; the 256 specials follow at len(file).
    """
    tokens = [bytes([b]) for b in range(256)] + list(TIKTOKEN_MERGES)
    lines = [f"{base64.b64encode(token).decode()} {rank}" for rank, token in enumerate(tokens)]
    path = Path(directory) / "tokenizer.model"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_tiny_hf_tokenizer(directory: Path, vocab_size: int = 400) -> Path:
    """Write a byte-level BPE `tokenizer.json` (Qwen2-like specials) and a `tokenizer_config.json`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size not in _hf_cache:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(HF_SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
        _hf_cache[vocab_size] = tokenizer.to_str()
    directory = Path(directory)
    path = directory / "tokenizer.json"
    path.write_text(_hf_cache[vocab_size])
    config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return path
