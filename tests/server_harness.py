"""A real HTTP server for the server tests: a tiny random model served by uvicorn on a free loopback port."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tiny_model import build_tiny_engine

from engine.build import Engine
from llama.sampling import SamplingParams
from server.app import EngineServer, create_app

CTX = 256
SECRET = "s3cret-token"


def build_server_engine(root: Path, ctx: int = CTX, **overrides: Any) -> Engine:
    """The shared tiny engine, with the server's default sampling: greedy, repetition penalty left at its default;
    overrides: other RunConfig fields (max_body, allowed_hosts)."""
    return build_tiny_engine(root, ctx, sampling=SamplingParams(temperature=0.0), **overrides)


@contextmanager
def running_server(engine: Engine, shared_secret: str | None = None) -> Iterator[str]:
    """Serve `engine` in a background thread; yields the base URL (http://127.0.0.1:PORT)."""
    # IPPROTO_TCP given explicitly: asyncio turns Nagle off only on sockets whose proto says TCP
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = EngineServer(create_app(engine, shared_secret), log_level="warning")
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
