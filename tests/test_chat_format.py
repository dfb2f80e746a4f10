from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_tokenizer import train_tiny_sentencepiece, write_tiny_hf_tokenizer, write_tiny_tiktoken

from llama.chat_format import Message, detect_chat_format, get_chat_format
from llama.errors import UserError
from llama.tokenizer import Tokenizer, load_tokenizer

# Ids of the tiny tiktoken file: bytes are their own ids; merges "er" 261, "an" 262, "\n\n" 267;
# specials from 268: begin 268, end 269, start_header 274, end_header 275, eom 276, eot 277.
BEGIN, END, START_HEADER, END_HEADER, EOM, EOT = 268, 269, 274, 275, 276, 277
USER = [ord("u"), ord("s"), 261]
ASSISTANT = [ord(c) for c in "assist"] + [262, ord("t")]
SYSTEM = [ord(c) for c in "system"]
NN = [267]


@pytest.fixture
def sp(tmp_path: Path) -> Tokenizer:
    return load_tokenizer(train_tiny_sentencepiece(tmp_path))


@pytest.fixture
def tiktoken_tok(tmp_path: Path) -> Tokenizer:
    return load_tokenizer(write_tiny_tiktoken(tmp_path))


@pytest.fixture
def hf(tmp_path: Path) -> Tokenizer:
    return load_tokenizer(write_tiny_hf_tokenizer(tmp_path))


def test_llama3_exact_ids(tiktoken_tok: Tokenizer) -> None:
    fmt = get_chat_format("llama3", tiktoken_tok)
    ids = fmt.encode_dialog([Message("system", "Be"), Message("user", " hi \n")])
    assert ids == (
        [BEGIN, START_HEADER, *SYSTEM, END_HEADER, *NN, ord("B"), ord("e"), EOT]
        + [START_HEADER, *USER, END_HEADER, *NN, ord("h"), ord("i"), EOT]
        + [START_HEADER, *ASSISTANT, END_HEADER, *NN]
    )
    assert fmt.stop_ids == {END, EOM, EOT}
    assert fmt.assistant_end_ids == [EOT]


def test_llama2_layout(sp: Tokenizer) -> None:
    fmt = get_chat_format("llama2", sp)
    dialog = [
        Message("system", "Be brief."),
        Message("user", "Hi"),
        Message("assistant", " Hello there. "),
        Message("user", "Bye"),
    ]
    ids = fmt.encode_dialog(dialog)
    first = sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]")
    expected = [1, *first, *sp.encode("Hello there."), 2, 1, *sp.encode("[INST] Bye [/INST]")]
    assert ids == expected
    assert [i for i in ids if i in (1, 2)] == [1, 2, 1]  # BOS/EOS are real ids, one pair per exchange
    assert sp.decode(ids) == "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello there. [INST] Bye [/INST]"
    assert fmt.stop_ids == {2}


def test_chatml_matches_whole_string_tokenization(hf: Tokenizer, tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HFBackend

    fmt = get_chat_format("chatml", hf)
    dialog = [Message("system", "You are nice."), Message("user", "Hi there"), Message("assistant", "Hello!"),
              Message("user", "How are you?")]
    text = (
        "<|im_start|>system\nYou are nice.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n"
    )
    reference = HFBackend.from_file(str(tmp_path / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    ids = fmt.encode_dialog(dialog)
    assert ids == reference
    assert hf.special_ids["<|im_start|>"] == ids[0]
    assert fmt.stop_ids == {hf.special_ids["<|im_end|>"]}


def test_raw_is_plain_text(sp: Tokenizer, hf: Tokenizer) -> None:
    dialog = [Message("user", "Once upon a time"), Message("assistant", " there was"), Message("user", " a fox")]
    assert get_chat_format("raw", sp).encode_dialog(dialog) == [
        1, *sp.encode("Once upon a time"), *sp.encode(" there was"), *sp.encode(" a fox")
    ]
    ids = get_chat_format("raw", hf).encode_dialog(dialog)  # no BOS in this tokenizer
    assert hf.decode(ids) == "Once upon a time there was a fox"


CASES = [("llama2", "sp"), ("llama3", "tiktoken_tok"), ("chatml", "hf"), ("raw", "sp"), ("raw", "hf")]


@pytest.mark.parametrize(("name", "fixture"), CASES)
@pytest.mark.parametrize("system", [None, "You are a helpful assistant."])
def test_prefix_stable(name: str, fixture: str, system: str | None, request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(fixture)
    fmt = get_chat_format(name, tok)
    dialog = ([Message("system", system)] if system else []) + [Message("user", "What is the capital of France?")]
    reply, question = "The capital of France is Paris.", "Thank you, and of Italy?"
    first = fmt.encode_dialog(dialog)
    second = fmt.encode_dialog(dialog + [Message("assistant", reply), Message("user", question)])
    reply_ids = tok.encode(reply)
    assert fmt.encode_reply(reply) == reply_ids
    assert second[: len(first)] == first
    assert second[len(first) : len(first) + len(reply_ids)] == reply_ids
    rest = second[len(first) + len(reply_ids) :]
    assert rest[: len(fmt.assistant_end_ids)] == fmt.assistant_end_ids
    assert rest == fmt.encode_followup(Message("user", question))
    # Another exchange keeps the property.
    third = fmt.encode_dialog(dialog + [Message("assistant", reply), Message("user", question),
                                        Message("assistant", "Rome."), Message("user", "Thanks")])
    assert third == second + fmt.encode_reply("Rome.") + fmt.encode_followup(Message("user", "Thanks"))


def test_llama2_turn_order_errors(sp: Tokenizer) -> None:
    fmt = get_chat_format("llama2", sp)
    with pytest.raises(UserError, match="message 0 must be from the user"):
        fmt.encode_dialog([Message("assistant", "hi")])
    with pytest.raises(UserError, match="last message must be from the user"):
        fmt.encode_dialog([Message("user", "hi"), Message("assistant", "hello")])
    with pytest.raises(UserError, match="system message must be followed by a user"):
        fmt.encode_dialog([Message("system", "s")])
    with pytest.raises(UserError, match="role must be one of"):
        fmt.encode_dialog([Message("tool", "x")])  # type: ignore[arg-type]


def test_unknown_format_lists_the_valid_ones(sp: Tokenizer) -> None:
    with pytest.raises(UserError, match=r"--chat_format.*'vicuna'.*chatml, llama2, llama3, raw"):
        get_chat_format("vicuna", sp)


def test_format_needs_its_special_tokens(sp: Tokenizer) -> None:
    with pytest.raises(UserError, match="<|im_start|>"):
        get_chat_format("chatml", sp)
    with pytest.raises(UserError, match="<|begin_of_text|>"):
        get_chat_format("llama3", sp)


def test_detect_chat_format(tmp_path: Path) -> None:
    dirs = {name: tmp_path / name for name in ("sp", "tiktoken", "hf", "base", "mistral")}
    for d in dirs.values():
        d.mkdir()
    sp = load_tokenizer(train_tiny_sentencepiece(dirs["sp"]))
    assert detect_chat_format(load_tokenizer(write_tiny_tiktoken(dirs["tiktoken"])), dirs["tiktoken"]) == "llama3"
    assert detect_chat_format(load_tokenizer(write_tiny_hf_tokenizer(dirs["hf"])), dirs["hf"]) == "chatml"
    assert detect_chat_format(sp, dirs["sp"]) == "llama2"  # a Meta directory: no tokenizer_config.json
    (dirs["base"] / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    assert detect_chat_format(sp, dirs["base"]) == "raw"
    template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    (dirs["mistral"] / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    assert detect_chat_format(sp, dirs["mistral"]) == "llama2"
