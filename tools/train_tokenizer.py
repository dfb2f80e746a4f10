"""Train the bundled model's SentencePiece vocabulary on the training corpus (CPU, a minute or two).

Settings keep source code intact: identity normalization, no dummy prefix, no whitespace collapsing,
runs of spaces as pieces (indentation), digits split, and byte fallback for everything else (a newline
is the byte piece <0x0A>, as in Llama 2). Ids: unk 0, bos 1, eos 2, no pad. The script checks that
decode(encode(text)) == text for every training module and the held-out file before writing.

    python tools/train_tokenizer.py         # .corpus/train.jsonl.gz -> models/pytiny/tokenizer.model
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm


def corpus_texts(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def lines(texts: list[str]) -> Iterator[str]:
    # SentencePiece learns from lines; blank ones carry nothing but the newline byte.
    for text in texts:
        yield from (line for line in text.split("\n") if line.strip())


def train(texts: list[str], vocab_size: int) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(texts),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=0.9999,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=4096,
        num_threads=2,
        minloglevel=2,
    )
    return model.getvalue()


def check_round_trip(sp: spm.SentencePieceProcessor, texts: list[str]) -> int:
    """Raise if any text does not survive encode/decode; return the total token count."""
    total = 0
    for i, text in enumerate(texts):
        ids = sp.encode(text)
        if sp.decode(ids) != text:
            raise SystemExit(f"round trip failed on text {i}")
        total += len(ids)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path(".corpus/train.jsonl.gz"))
    parser.add_argument("--heldout", type=Path, default=Path("data/heldout_stdlib.txt"))
    parser.add_argument("--vocab-size", type=int, default=6144)
    parser.add_argument("--out", type=Path, default=Path("models/pytiny/tokenizer.model"))
    args = parser.parse_args()

    texts = corpus_texts(args.corpus)
    model = train(texts, args.vocab_size)
    sp = spm.SentencePieceProcessor(model_proto=model)
    n_train = check_round_trip(sp, texts)
    heldout = args.heldout.read_text(encoding="utf-8")
    n_heldout = check_round_trip(sp, [heldout])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(model)
    chars = sum(map(len, texts))
    print(f"vocab {sp.get_piece_size()}: train {n_train:,} tokens ({chars / n_train:.2f} chars/token), "
          f"held out {n_heldout:,} tokens ({len(heldout) / n_heldout:.2f} chars/token) -> {args.out}")


if __name__ == "__main__":
    main()
