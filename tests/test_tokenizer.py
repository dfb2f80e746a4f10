from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_tokenizer import train_tiny_sentencepiece, write_tiny_hf_tokenizer, write_tiny_tiktoken

from llama.errors import UserError
from llama.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    StreamDecoder,
    TiktokenTokenizer,
    Tokenizer,
    _split_long_runs,
    load_tokenizer,
)

WRITERS = {
    "sentencepiece": train_tiny_sentencepiece,
    "tiktoken": write_tiny_tiktoken,
    "hf": write_tiny_hf_tokenizer,
}
TEXTS = [
    "Hello the world!",
    "  leading spaces,  double  spaces and trailing ",
    "Café crème brûlée, naïve façade, jalapeño ñ Ü ß",
    "emoji 😀🎉 and a flag 🇫🇷, CJK 你好世界, math ∑∫",
    "lines\n\nand\ttabs\r\n 12345 3.14",
]
MULTIBYTE = "Zürich 😀 café — 你好 🎉🇫🇷 ok"


@pytest.fixture(params=list(WRITERS))
def tokenizer(request: pytest.FixtureRequest, tmp_path: Path) -> Tokenizer:
    WRITERS[request.param](tmp_path)
    return load_tokenizer(tmp_path)


def test_load_picks_the_kind_from_content(tmp_path: Path) -> None:
    kinds = {}
    for name, write in WRITERS.items():
        (tmp_path / name).mkdir()
        kinds[name] = type(load_tokenizer(write(tmp_path / name)))
    assert kinds == {"sentencepiece": SentencePieceTokenizer, "tiktoken": TiktokenTokenizer, "hf": HFTokenizer}


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_bos_and_eos_flags(tokenizer: Tokenizer) -> None:
    plain = tokenizer.encode("the cat")
    both = tokenizer.encode("the cat", bos=True, eos=True)
    head = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    assert both == head + plain + [tokenizer.eos_id]
    assert tokenizer.eos_id in tokenizer.stop_ids


def test_special_token_text_is_encoded_as_plain_text(tokenizer: Tokenizer) -> None:
    for name, special_id in tokenizer.special_ids.items():
        ids = tokenizer.encode(f"a {name} b")
        assert special_id not in ids
        assert tokenizer.decode(ids) == f"a {name} b"


def test_stream_decoder_equals_full_decode(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(MULTIBYTE, bos=True)
    decoder = StreamDecoder(tokenizer)
    chunks = [decoder.push(i) for i in ids]
    assert decoder.flush() == ""
    assert "".join(chunks) == tokenizer.decode(ids)
    assert not any("\ufffd" in c for c in chunks)
    # Text comes out as it is complete, not all at the end.
    assert sum(1 for c in chunks if c) >= len(MULTIBYTE.split())


@pytest.mark.parametrize("text", TEXTS)
def test_stream_decoder_keeps_spaces(tokenizer: Tokenizer, text: str) -> None:
    decoder = StreamDecoder(tokenizer)
    ids = tokenizer.encode(text)
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == text


def test_stream_decoder_holds_back_an_unfinished_character(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ab😀")
    tail = 1 if isinstance(tokenizer, SentencePieceTokenizer) else 0  # byte pieces: drop the last byte
    cut = len(ids) - 1 if tail else _first_partial_prefix(tokenizer, ids)
    decoder = StreamDecoder(tokenizer)
    out = "".join(decoder.push(i) for i in ids[:cut])
    assert out == "ab"
    assert decoder.flush().startswith("\ufffd")


def _first_partial_prefix(tokenizer: Tokenizer, ids: list[int]) -> int:
    """Length of the first prefix of ids that decodes to an unfinished character."""
    for n in range(1, len(ids)):
        if tokenizer.decode(ids[:n]).endswith("\ufffd"):
            return n
    raise AssertionError("the emoji is a single token; the test needs it split in bytes")


def test_sentencepiece_ids_and_pieces(tmp_path: Path) -> None:
    tok = load_tokenizer(train_tiny_sentencepiece(tmp_path))
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (1, 2, {2})
    assert tok.special_ids == {"<unk>": 0, "<s>": 1, "</s>": 2}
    assert tok.vocab_size == 400
    pieces = [tok.id_to_piece(i) for i in tok.encode(" the 😀")]
    assert pieces[0].startswith("▁")
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]  # byte fallback


def test_tiktoken_merges_and_specials(tmp_path: Path) -> None:
    tok = load_tokenizer(write_tiny_tiktoken(tmp_path))
    # 256 byte ranks, then merges: th 256, he 257, the 258, " the" 259, ..., hello 266, "\n\n" 267.
    assert tok.encode("the") == [258]
    assert tok.encode("hello the") == [266, 259]
    assert tok.encode("Hi") == [ord("H"), ord("i")]
    first = 256 + 12
    assert tok.vocab_size == first + 256
    offsets = {name: tok.special_ids[name] - first for name in (
        "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
        "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>", "<|reserved_special_token_247|>")}
    # Same offsets as Llama 3 from 128000: 128000, 128001, 128004, 128006, 128007, 128008, 128009, 128010, 128255.
    assert list(offsets.values()) == [0, 1, 4, 6, 7, 8, 9, 10, 255]
    assert len(tok.special_ids) == 256
    assert (tok.bos_id, tok.eos_id) == (first, first + 1)
    assert tok.stop_ids == {first + 1, first + 8, first + 9}
    assert tok.decode([first, 266, first + 9]) == "<|begin_of_text|>hello<|eot_id|>"
    assert tok.id_to_piece(259) == " the"
    assert tok.id_to_piece(0xF0) == "\\xf0"


def test_tiktoken_long_whitespace_run(tmp_path: Path) -> None:
    tok = load_tokenizer(write_tiny_tiktoken(tmp_path))
    text = "a" + " " * 60_000 + "b"
    assert tok.decode(tok.encode(text)) == text


def test_split_long_runs_cuts_only_long_runs() -> None:
    assert list(_split_long_runs("ab" + " " * 7 + "c", 3)) == ["ab   ", "   ", " c"]
    assert list(_split_long_runs("short text", 3 + 100)) == ["short text"]


def test_hf_ids_from_config_files(tmp_path: Path) -> None:
    write_tiny_hf_tokenizer(tmp_path)
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    im_end = tok.special_ids["<|im_end|>"]
    assert tok.bos_id is None  # tokenizer_config.json says null, as Qwen2's does
    assert tok.eos_id == im_end
    assert tok.stop_ids == {im_end}
    assert tok.vocab_size == 400
    assert set(tok.special_ids) == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}
    endoftext = tok.special_ids["<|endoftext|>"]
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": endoftext, "eos_token_id": endoftext}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, 7]}))
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id is None
    assert tok.stop_ids == {im_end, endoftext, 7}
    assert tok.id_to_piece(tok.encode(" the")[0]).startswith("Ġ")


def test_hf_without_tokenizer_config(tmp_path: Path) -> None:
    write_tiny_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id is None
    assert tok.eos_id == tok.special_ids["<|endoftext|>"]  # the first known EOS name in the vocabulary
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (1, 2, {0, 2})


def test_hf_unknown_eos_name_is_a_user_error(tmp_path: Path) -> None:
    write_tiny_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<nope>"}}))
    with pytest.raises(UserError, match=r"tokenizer_config\.json.*<nope>"):
        load_tokenizer(tmp_path)


def test_directory_prefers_tokenizer_model(tmp_path: Path) -> None:
    write_tiny_hf_tokenizer(tmp_path)
    train_tiny_sentencepiece(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("tokenizer.model", bytes(range(256)) * 8, "not a valid SentencePiece"),
        ("tokenizer.model", b"\n\x05hello", "not a valid SentencePiece"),
        ("tokenizer.model", b"", "empty"),
        ("tokenizer.model", b"IQ== 0\nIg== 1\nnot-base64! 2\n", r"tokenizer\.model:3: expected"),
        ("tokenizer.model", b"IQ== 0\nIg== 5\n", "ranks"),
        ("tokenizer.json", b'{"model": {"type": "BPE"', "not a valid tokenizer.json"),
    ],
)
def test_corrupt_file_is_a_user_error_naming_it(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as err:
        load_tokenizer(path)
    assert str(path) in str(err.value)


def test_missing_tokenizer_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no tokenizer.model or tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(UserError, match="not found") as err:
        load_tokenizer(tmp_path / "missing.model")
    assert "missing.model" in str(err.value)
