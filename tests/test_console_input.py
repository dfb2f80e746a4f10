"""The console as a user types into it: multiline messages, commands, bytes that are not UTF-8, reply length."""
from __future__ import annotations

import io
from pathlib import Path

import pytest
from cli_runner import CPU_GREEDY, main_error, run_app
from tiny_model import make_tiny_model_dir

import app
from engine.console_input import command_of, read_message, replace_bad_bytes


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("console-input"))


def _messages(typed: str) -> list[str]:
    inp, out, got = io.StringIO(typed), io.StringIO(), []
    while (message := read_message(inp, out)) is not None:
        got.append(message)
    return got


def test_backslash_continues_and_triple_quotes_make_a_block():
    typed = 'one \\\ntwo \\\nthree\n"""\nblock a\n\nblock b\n"""\nlast\n'
    assert _messages(typed) == ["one \ntwo \nthree", "block a\n\nblock b", "last"]


def test_commands_are_slash_and_letters_only():
    assert [command_of(m) for m in ["/help", " /reset now", "/foo", "/usr/bin is a directory", "hi /exit"]] == [
        "/help", "/reset", "/foo", None, None]


def test_undecodable_bytes_become_replacement_characters():
    text = b"caf\xe9 \xff ok".decode("utf-8", errors="surrogateescape")
    assert replace_bad_bytes(text) == ("caf\ufffd \ufffd ok", 2)


def test_console_session_with_bad_bytes_multiline_and_commands(model_dir):
    typed = b'hello \xff\xfe there\n/foo\n/help\nline one \\\nline two\n"""\nblock\n"""\n/exit\nnever read\n'
    r = run_app(str(model_dir), "--max_new_tokens", "3", "--chat_format", "raw", *CPU_GREEDY, stdin=typed)
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "Traceback" not in err
    assert "2 bytes that are not UTF-8 became U+FFFD" in err
    assert "unknown command /foo" in err and "/help show these commands" in err
    assert err.count("[prefill ") == 3  # the bad-bytes message, the continued one, the block; not the commands


def test_prompt_with_bad_bytes_is_answered(model_dir):
    r = run_app(str(model_dir), "--prompt", "hello \udcff there", "--max_new_tokens", "3", *CPU_GREEDY)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "1 byte that are not UTF-8" in r.stderr and "decode 3 tok" in r.stderr


def test_console_replies_are_shorter_by_default(model_dir):
    console = app.config_from_args(app.build_parser().parse_args([str(model_dir)]))
    prompt = app.config_from_args(app.build_parser().parse_args([str(model_dir), "--prompt", "hi"]))
    assert console.max_new_tokens == 256 and prompt.max_new_tokens == 512
    r = run_app(str(model_dir), *CPU_GREEDY, stdin="/exit\n")
    assert "replies up to 256 tokens" in r.stderr


def test_context_larger_than_memory_names_the_kv_cache_size(model_dir, capsys):
    line = main_error(capsys, model_dir, "--ctx", str(10**10), "--prompt", "hi", *CPU_GREEDY)
    # 2 x 2 layers x 1e10 positions x 4 heads x 16 x 4 bytes
    assert "--ctx 10000000000" in line and "KV cache would need 9536.7 GiB" in line
