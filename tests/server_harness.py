"""A real HTTP server for the server tests: a tiny random model served by uvicorn on a free loopback port."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from tiny_model import build_tiny_engine

from engine.build import Engine
from llama.sampling import SamplingParams
from server.app import create_app

CTX = 256
SECRET = "s3cret-token"


def build_server_engine(root: Path, ctx: int = CTX) -> Engine:
    """The shared tiny engine, with the server's default sampling: greedy, repetition penalty left at its default."""
    return build_tiny_engine(root, ctx, sampling=SamplingParams(temperature=0.0))


@contextmanager
def running_server(engine: Engine, shared_secret: str | None = None) -> Iterator[str]:
    """Serve `engine` in a background thread; yields the base URL (http://127.0.0.1:PORT)."""
    # IPPROTO_TCP given explicitly: asyncio turns Nagle off only on sockets whose proto says TCP
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(engine, shared_secret), log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
