"""`app.py MODEL_DIR --serve HOST:PORT --shared_secret S` end to end, in a subprocess."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
from fixtures import make_meta_checkpoint, tiny_args
from tiny_tokenizer import train_tiny_sentencepiece

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_app_serves_until_interrupted(tmp_path: Path) -> None:
    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    make_meta_checkpoint(tiny_args(vocab_size=400), model_dir)
    train_tiny_sentencepiece(model_dir)
    port = free_port()
    cmd = [sys.executable, str(REPO / "app.py"), str(model_dir), "--device", "cpu", "--temperature", "0",
           "--serve", f"127.0.0.1:{port}", "--shared_secret", "xyzzy"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                ping = httpx.get(f"http://127.0.0.1:{port}/basilisk/ping", headers={"Authorization": "xyzzy"})
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        assert ping.text == "pong"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="xyzzy", max_retries=0)
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert reply.model == "tiny" and reply.usage.completion_tokens <= 3
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, output
    assert f"http://127.0.0.1:{port}" in output


def test_bad_serve_spec_is_one_line_error(tmp_path: Path) -> None:
    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    make_meta_checkpoint(tiny_args(vocab_size=400), model_dir)
    train_tiny_sentencepiece(model_dir)
    cmd = [sys.executable, str(REPO / "app.py"), str(model_dir), "--device", "cpu", "--serve", "localhost:http"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 2
    assert "--serve" in done.stderr.strip().splitlines()[-1]
