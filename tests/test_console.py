"""The console driven as a user drives it: a subprocess with piped stdin, and the one-shot --prompt mode."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_model import make_tiny_model_dir

ROOT = Path(__file__).resolve().parent.parent
GREEDY_FLAGS = ["--temperature", "0", "--repetition_penalty", "1.0", "--device", "cpu", "--dtype", "float32"]

LONG_REPLY = 8000  # tokens the Ctrl-C test's replies may run to


def _app(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "app.py"), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("console"))


def test_prompt_mode_prints_only_the_reply(model_dir):
    a = _app(str(model_dir), "--prompt", "hello there", "--max_new_tokens", "8", *GREEDY_FLAGS)
    b = _app(str(model_dir), "--prompt", "hello there", "--max_new_tokens", "8", *GREEDY_FLAGS)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()
    assert "loading" not in a.stdout and "tok/s" in a.stderr


def test_chat_turns_reset_and_exit(model_dir):
    script = "hello there\nhow are you\n/reset\nhello there\n/exit\nnever read\n"
    r = _app(str(model_dir), "--max_new_tokens", "6", "--chat_format", "llama2", *GREEDY_FLAGS, stdin=script)
    assert r.returncode == 0, r.stderr
    replies = [line for line in r.stdout.split("> ") if line.strip()]
    assert len(replies) == 3
    assert replies[0] == replies[2]  # after /reset the same message gets the same greedy reply
    assert "(conversation cleared)" in r.stderr
    prefills = [int(s.split()[0]) for s in r.stderr.split("[prefill ")[1:]]
    assert prefills[1] < prefills[0] + 6 + 12  # the second turn reused the cache: only new tokens ran
    assert prefills[2] == 1  # the reset dialog is a prefix the cache still holds: only the last token reruns


def test_bad_flag_is_one_line_and_exit_2(model_dir):
    r = _app(str(model_dir), "--no_such_flag")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--no_such_flag" in r.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["/nonexistent/model"], "/nonexistent/model"),
        (["{model}", "--chat_format", "klingon"], "klingon"),
        (["{model}", "--temperature", "-1"], "--temperature"),
        (["{model}", "--device", "cuda"], "--device"),
        (["{model}", "--offload_exclusion", "[w1,w2]"], "--offload_exclusion"),
        (["{model}", "--use_8bit", "--quant", "int4"], "--use_8bit"),
        (["{model}", "--serve", "localhost:notaport"], "--serve"),
        (["{model}", "--ppl", "/nonexistent/text.txt"], "/nonexistent/text.txt"),
        pytest.param(
            ["{model}", "--use_offload"],
            "--use_offload",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="offloading works where there is a GPU"),
        ),
    ],
)
def test_bad_input_gets_one_line_naming_it(model_dir, args, needle):
    r = _app(*[a.format(model=model_dir) for a in args], "--prompt", "hi")
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0]
    assert "Traceback" not in r.stderr


def test_prompt_longer_than_context_is_an_error(model_dir):
    r = _app(str(model_dir), "--ctx", "32", "--prompt", "word " * 100, *GREEDY_FLAGS)
    assert r.returncode == 2 and "longer than the context" in r.stderr


def test_tokenizer_that_does_not_match_the_model_is_refused(model_dir):
    bundled_tokenizer = ROOT / "models" / "pytiny" / "tokenizer.model"  # 6144 pieces; the model has 400
    r = _app(str(model_dir), str(bundled_tokenizer), "--prompt", "hi")
    assert r.returncode == 2 and "vocab_size 400" in r.stderr and "Traceback" not in r.stderr


def test_ctrl_c_stops_the_reply_and_keeps_the_conversation():
    """A real SIGINT in the middle of a long reply of the bundled model; then another turn and /exit. The reply
    may run to 8000 tokens (half a minute and more), so that it is still running when the signal comes even on
    a loaded machine (at 900 tokens a busy CI machine once let it end first)."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--max_new_tokens", str(LONG_REPLY), "--ctx", str(2 * LONG_REPLY),
         "--seed", "1", "--device", "cpu"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"},
    )
    try:
        proc.stdin.write("def parse(text):\n")
        proc.stdin.flush()
        seen = ""
        while len(seen) < 120:  # the prompt marker, then the start of the reply
            seen += proc.stdout.read(1)
        proc.send_signal(signal.SIGINT)
        proc.stdin.write("class Point:\n")
        proc.stdin.flush()
        seen = ""  # the next prompt marker, then the start of the second reply, which is interrupted too:
        while "\n> " not in seen or len(seen.split("\n> ", 1)[1]) < 20:  # a small model rarely emits EOS
            if not (char := proc.stdout.read(1)):
                break
            seen += char
        proc.send_signal(signal.SIGINT)
        proc.stdin.write("/exit\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    stats = [line for line in err.splitlines() if line.startswith("[prefill")]
    assert len(stats) == 2 and "stop: interrupted" in stats[0]
    first_prefill, second_prefill = (int(s.split()[1]) for s in stats)
    interrupted_tokens = int(stats[0].split("decode ")[1].split()[0])
    assert 20 < interrupted_tokens < LONG_REPLY
    # The second turn reused the cache: only the last reply token and the new message ran, not the dialog.
    assert second_prefill <= 12 < first_prefill + interrupted_tokens
