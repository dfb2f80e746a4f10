"""A real HTTP server for the server tests: a tiny random model served by uvicorn on a free loopback port,
in a thread of the test process or as `app.py --serve` in a process of its own."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
from batch_testing import RecordingDecoder
from tiny_model import build_tiny_engine

from engine.build import Engine
from llama.batch_decoder import BatchDecoder
from llama.sampling import SamplingParams
from server.app import EngineServer, create_app

CTX = 256
MAX_BATCH = 4  # sequences the test servers decode together
SECRET = "s3cret-token"
REPO = Path(__file__).resolve().parent.parent
PING_BOUND_S = 1.0  # a ping must be answered this soon, whatever else the server is doing


def build_server_engine(root: Path, ctx: int = CTX, **overrides: Any) -> Engine:
    """The shared tiny engine, with the server's default sampling: greedy, repetition penalty left at its default,
    MAX_BATCH slots; overrides: other RunConfig fields (max_body, allowed_hosts, max_batch)."""
    overrides.setdefault("max_batch", MAX_BATCH)
    return build_tiny_engine(root, ctx, sampling=SamplingParams(temperature=0.0), **overrides)


@dataclass
class RecordedServer:
    url: str
    engine: Engine
    recorder: RecordingDecoder  # the server's decoder, recording every job and step


@contextmanager
def recorded_server(root: Path) -> Iterator[RecordedServer]:
    """The shared tiny engine served in a thread through a RecordingDecoder."""
    engine = build_server_engine(root)
    recorder = RecordingDecoder(engine.generator, engine.kv)
    with running_server(engine, SECRET, recorder) as url:
        yield RecordedServer(url, engine, recorder)


@contextmanager
def running_server(
    engine: Engine, shared_secret: str | None = None, decoder: BatchDecoder | None = None
) -> Iterator[str]:
    """Serve `engine` in a background thread (through `decoder` if given); yields the base URL
    (http://127.0.0.1:PORT)."""
    # IPPROTO_TCP given explicitly: asyncio turns Nagle off only on sockets whose proto says TCP
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = EngineServer(create_app(engine, shared_secret, decoder=decoder), log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), "the test server started", timeout=20)
    if not server.started:
        raise RuntimeError("the test server did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Poll until condition() holds. The timeout only ends a hang: how soon it holds decides nothing."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)


def ping(http: httpx.Client) -> float:
    """Seconds until /basilisk/ping answered (a blocked server fails here after 10 s). Pass a client that
    stays open: a new one costs tens of milliseconds of its own."""
    start = time.monotonic()
    assert http.get("/basilisk/ping", timeout=10).text == "pong"
    return time.monotonic() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


@dataclass
class AppProcess:
    url: str
    proc: subprocess.Popen[bytes]
    log: IO[bytes]  # its stdout and stderr: a file, which (unlike a pipe nobody reads) never fills up

    def stop(self, sig: int, timeout: float = 30) -> str:
        """Send `sig`; the process's output once it has exited (TimeoutExpired if it does not in time)."""
        self.proc.send_signal(sig)
        self.proc.wait(timeout=timeout)
        return self.output()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


@contextmanager
def app_process(model_dir: Path, *flags: str) -> Iterator[AppProcess]:
    """`app.py MODEL_DIR --device cpu --serve 127.0.0.1:PORT FLAGS` in a subprocess, once it answers."""
    url_host = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, str(REPO / "app.py"), str(model_dir), "--device", "cpu", "--serve", url_host, *flags]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        app = AppProcess(f"http://{url_host}", proc, log)
        try:
            wait_until(lambda: proc.poll() is not None or answers(app.url), "the server answered", timeout=120)
            assert proc.poll() is None, app.output()
            yield app
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
