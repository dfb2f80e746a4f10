"""`app.py MODEL_DIR --serve HOST:PORT ...` end to end, in a subprocess: its flags, its liveness under a large
request, Ctrl-C, and SIGTERM in the middle of a generation."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from server_harness import PING_BOUND_S, REPO, AppProcess, app_process, ping, wait_until
from tiny_model import make_tiny_model_dir

from engine.batch_size import DEFAULT_BATCH_CAP
from server.basilisk import MAX_TOKENIZE_TOKENS

MAX_BODY = 2**20
SENTENCE = "the quick brown fox jumps over the lazy dog 12345 "
LONG_CTX = 16384  # a reply this long takes minutes on the CPU (attention over the whole cache per token)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppProcess]:
    model_dir = make_tiny_model_dir(tmp_path_factory.mktemp("cli"))
    with app_process(model_dir, "--temperature", "0", "--allowed_hosts", "My.Box, other.box", "--max_body", "1MiB") as a:
        yield a


def test_flags_set_the_allowed_hosts_and_the_body_cap(app: AppProcess) -> None:
    with httpx.Client(base_url=app.url, timeout=30) as http:
        assert http.get("/basilisk/ping", headers={"Host": "my.box:8000"}).text == "pong"
        assert http.get("/basilisk/ping", headers={"Host": "other.box"}).text == "pong"
        assert http.get("/basilisk/ping", headers={"Host": "evil.example"}).status_code == 403
        at_cap = json.dumps({"prompt": "x"}).ljust(MAX_BODY).encode()
        json_type = {"Content-Type": "application/json"}
        assert http.post("/basilisk/tokenize", content=at_cap, headers=json_type).status_code == 200
        assert http.post("/basilisk/tokenize", content=at_cap + b" ", headers=json_type).status_code == 413


def test_pings_are_answered_while_a_large_prompt_is_tokenized(app: AppProcess) -> None:
    # half as many tokens as /tokenize takes: their fragments are seconds of pure-Python work on 2 cores
    text = SENTENCE * (MAX_TOKENIZE_TOKENS // 2 // 30)
    waits, during = [], []
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=app.url) as http:
        large = pool.submit(httpx.post, app.url + "/basilisk/tokenize", json={"prompt": text}, timeout=120)
        while not large.done():
            waits.append(ping(http))
            during.append(not large.done())  # the large request was still in progress when the ping came back
    assert large.result().status_code == 200 and len(large.result().json()["tokens"]) > MAX_TOKENIZE_TOKENS // 3
    assert sum(during) >= 3, waits
    assert max(waits) < PING_BOUND_S, waits


def test_app_serves_until_interrupted(tmp_path: Path) -> None:
    with app_process(make_tiny_model_dir(tmp_path), "--temperature", "0", "--shared_secret", "xyzzy") as a:
        assert httpx.get(a.url + "/basilisk/ping", headers={"Authorization": "xyzzy"}).text == "pong"
        client = openai.OpenAI(base_url=a.url + "/v1", api_key="xyzzy", max_retries=0)
        reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert reply.model == "tiny-llama" and reply.usage.completion_tokens <= 3
        output = a.stop(signal.SIGINT)
    assert a.proc.returncode == 0, output
    assert a.url in output


def test_sigterm_mid_generation_ends_every_request_and_the_process(tmp_path: Path) -> None:
    # One sequence at a time (today's queue), so that the second request waits while the first decodes.
    flags = ("--ctx", str(LONG_CTX), "--temperature", "0", "--max_batch", "1")
    with app_process(make_tiny_model_dir(tmp_path, ctx=LONG_CTX), *flags) as a:
        body = {"prompt": "once", "max_tokens": LONG_CTX - 16, "stream": True, "logit_bias": {"2": -100}}  # no EOS
        with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=a.url, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json=body) as stream:
                events = (line.removeprefix("data: ") for line in stream.iter_lines() if line)
                assert "choices" in json.loads(next(events))  # the reply is being generated
                queued = pool.submit(httpx.post, a.url + "/basilisk/infer", json={"prompt": "x"}, timeout=60)
                wait_until(lambda: http.get("/health").json()["queued"] == 1, "the second request waits its turn")
                a.proc.send_signal(signal.SIGTERM)
                rest = list(events)
            assert queued.result().status_code == 503 and "shutting down" in queued.result().text
        try:
            a.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the server was still running 30 s after SIGTERM")
    assert json.loads(rest[-1])["error"]["message"] == "the server is shutting down"
    assert a.proc.returncode == 0, a.output()


def test_max_batch_sets_the_slots_and_config_reports_the_load(tmp_path: Path) -> None:
    with app_process(make_tiny_model_dir(tmp_path), "--temperature", "0", "--max_batch", "3") as a:
        with httpx.Client(base_url=a.url, timeout=60) as http:
            with ThreadPoolExecutor(3) as pool:
                replies = list(pool.map(lambda p: http.post("/v1/completions", json={"prompt": p, "max_tokens": 5}),
                                        ["one", "two", "three"]))
            config = http.get("/basilisk/config").json()
        output = a.stop(signal.SIGINT)
    assert all(r.status_code == 200 for r in replies)
    assert config["max_batch"] == 3 and config["batch"]["max_batch"] == 3 and config["batch"]["decoded_tokens"] > 0
    assert "serving up to 3 sequences at once" in output


def test_max_batch_defaults_to_what_the_memory_holds(tmp_path: Path) -> None:
    with app_process(make_tiny_model_dir(tmp_path), "--temperature", "0") as a:
        config = httpx.get(a.url + "/basilisk/config", timeout=30).json()
        a.stop(signal.SIGINT)
    assert config["max_batch"] == DEFAULT_BATCH_CAP  # a tiny model's slots are small: the cap decides


@pytest.mark.parametrize("value", ["0", "257"])
def test_max_batch_out_of_range_is_one_line_error(tmp_path: Path, value: str) -> None:
    done = run_serve(tmp_path, "--max_batch", value)
    assert done.returncode == 2 and "--max_batch must be in [1, 256]" in done.stderr.strip().splitlines()[-1]


def test_max_batch_without_serve_is_refused(tmp_path: Path) -> None:
    done = run_serve(tmp_path, "--max_batch", "4", serve=False)
    assert done.returncode == 2 and "--max_batch only applies with --serve" in done.stderr.strip().splitlines()[-1]


def run_serve(tmp_path: Path, *flags: str, serve: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "app.py"), str(make_tiny_model_dir(tmp_path)), "--device", "cpu",
           *(["--serve", "8000"] if serve else ["--prompt", "hi"]), *flags]
    return subprocess.run(cmd, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": ""}, capture_output=True, text=True,
                          check=False, timeout=60)


@pytest.mark.parametrize("flag, value", [("--serve", "localhost:http"), ("--max_body", "lots")])
def test_bad_server_flag_is_one_line_error(tmp_path: Path, flag: str, value: str) -> None:
    done = run_serve(tmp_path, flag, value)
    assert done.returncode == 2
    assert flag in done.stderr.strip().splitlines()[-1]
