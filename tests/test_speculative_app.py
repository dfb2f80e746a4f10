"""Speculative decoding through app.py: --prompt output unchanged, --ppl unaffected, one-line errors."""
from __future__ import annotations

import pytest
from fixtures import make_meta_checkpoint, tiny_args
from speculative_testing import start_at_once
from test_console import GREEDY_FLAGS, _app
from tiny_model import make_tiny_model_dir
from tiny_tokenizer import train_tiny_sentencepiece

import app

PROMPT = ["--prompt", "The quick brown fox jumps over the lazy dog. The quick brown fox", "--max_new_tokens", "40"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec-app")
    return make_tiny_model_dir(root), make_tiny_model_dir(root, name="draft", dim=32, n_heads=2, n_kv_heads=2)


def _main(args: list[str], capsys) -> tuple[int, str, str]:
    """app.main in this process, for runs that fail before any reply is written."""
    rc = app.main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_prompt_reply_is_the_plain_greedy_one(dirs):
    target, draft = dirs
    want = _app(str(target), *GREEDY_FLAGS, *PROMPT)
    assert want.returncode == 0, want.stderr
    for flags in (["--lookup"], ["--draft", str(draft), "--lookup", "--draft_tokens", "5"]):
        got = _app(str(target), *GREEDY_FLAGS, *PROMPT, *flags)
        assert got.returncode == 0, got.stderr
        assert got.stdout == want.stdout and got.stderr.count("speculation: ") == 1
        assert "tok/pass" in got.stderr.splitlines()[-1]
    assert "speculation: not started yet" in got.stderr  # 40 tokens cannot repay starting the draft


def test_prompt_reply_once_speculation_starts_is_the_plain_greedy_one(dirs, capsys, monkeypatch):
    target, draft = dirs
    want = _app(str(target), *GREEDY_FLAGS, *PROMPT)
    start_at_once(monkeypatch)
    rc, out, err = _main([str(target), *GREEDY_FLAGS, *PROMPT, "--draft", str(draft), "--lookup"], capsys)
    assert rc == 0 and out == want.stdout
    assert err.count("speculation: ") == 1 and "not started" not in err  # the planner's choice, after its probe


def test_mirostat_turns_speculation_off_in_one_line(dirs):
    r = _app(str(dirs[0]), "--device", "cpu", "--mirostat", "2", "--lookup", *PROMPT)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("speculation: off with Mirostat") == 1 and "tok/pass" not in r.stderr


def test_ppl_is_unaffected(dirs, tmp_path):
    target, draft = dirs
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    args = [str(target), "--device", "cpu", "--ppl", str(text), "--ctx", "32"]
    plain, spec = _app(*args), _app(*args, "--draft", str(draft), "--lookup")
    assert plain.returncode == spec.returncode == 0 and spec.stdout == plain.stdout
    assert "speculation" not in spec.stderr


def test_draft_with_another_vocabulary_is_one_line(dirs, capsys, tmp_path):
    other = tmp_path / "other-vocab"
    other.mkdir()
    make_meta_checkpoint(tiny_args(vocab_size=360), other)
    train_tiny_sentencepiece(other, vocab_size=360)
    rc, _, err = _main([str(dirs[0]), *GREEDY_FLAGS, *PROMPT, "--draft", str(other)], capsys)
    assert rc == 2 and err.count("error") == 1 and "Traceback" not in err
    assert err.splitlines()[-1] == f"error: --draft {other}: its tokenizer has 360 tokens, the model's has 400"


def test_missing_draft_is_one_line(dirs, capsys, tmp_path):
    rc, _, err = _main([str(dirs[0]), *GREEDY_FLAGS, *PROMPT, "--draft", str(tmp_path / "missing")], capsys)
    assert rc == 2 and err.count("\n") == 1 and "--draft" in err and "missing" in err


@pytest.mark.parametrize("flags, needle", [
    (["--draft_tokens", "1", "--lookup"], "--draft_tokens"),
    (["--draft_quant", "int8"], "--draft_quant"),
])
def test_bad_speculation_flags_are_one_line(dirs, capsys, flags, needle):
    rc, _, err = _main([str(dirs[0]), *GREEDY_FLAGS, *PROMPT, *flags], capsys)
    assert rc == 2 and err.count("\n") == 1 and needle in err
