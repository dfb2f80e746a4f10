"""The HTTP server: basilisk's endpoints and an OpenAI-compatible API over one Engine.

`serve(engine, "[HOST:]PORT", secret)` runs it with uvicorn until interrupted (Ctrl-C or SIGTERM);
`create_app` builds the FastAPI app alone and `EngineServer` runs one (tests run it on a socket of their own).
The engine's RunConfig gives the body cap (max_body) and the hosts allowed besides the bound one.

A request passes, in order: the Host check (without a secret), the shared-secret check (with one), the
body cap, then its route. Routes do their CPU work (tokenizing, rendering big answers) in worker threads:
the event loop only moves bytes, so a large request never delays the others' answers.
"""
from __future__ import annotations

import signal
import socket
import sys
from typing import Any

import uvicorn
from fastapi import FastAPI

from engine.build import Engine
from llama.errors import UserError
from server import basilisk, health, openai_api
from server.auth import SharedSecretAuth
from server.body_limit import BodyLimit
from server.errors import install_error_handlers
from server.host_check import HostCheck
from llama.batch_decoder import BatchDecoder
from server.queue import EngineQueue
from server.serve_spec import DEFAULT_HOST, parse_serve_spec
from server.state import ServerState

SHUTDOWN_GRACE_S = 10  # after SIGTERM, how long responses may take to finish before they are cut off


def create_app(
    engine: Engine, shared_secret: str | None = None, host: str = DEFAULT_HOST, decoder: BatchDecoder | None = None
) -> FastAPI:
    """The app serving `engine` on `host`; with a secret, every request must carry it (see server.auth),
    without one, every request must name this server (see server.host_check). decoder: the engine's own
    BatchDecoder over its KV slots unless given (tests give one that records)."""
    app = FastAPI(title="llama-offload", docs_url=None, redoc_url=None, openapi_url=None)
    decoder = decoder if decoder is not None else BatchDecoder(engine.generator, engine.kv)
    app.state.server = ServerState(engine, EngineQueue(decoder), model_name=engine.cfg.model_dir.name)
    app.include_router(basilisk.router)
    app.include_router(openai_api.router)
    app.include_router(health.router)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_body=engine.cfg.max_body)  # the last added runs first
    if shared_secret is not None:
        app.add_middleware(SharedSecretAuth, secret=shared_secret)
    else:
        app.add_middleware(HostCheck, bound_host=host, allowed_hosts=engine.cfg.allowed_hosts)
    return app


class EngineServer(uvicorn.Server):
    """uvicorn's server, which on shutdown first stops the engine's queue: the running sequences end at their
    next step and waiting requests get a 503, so in-flight responses finish and the process can exit."""

    def __init__(self, app: FastAPI, **config: Any) -> None:
        super().__init__(uvicorn.Config(app, timeout_graceful_shutdown=SHUTDOWN_GRACE_S, **config))
        self.queue: EngineQueue = app.state.server.queue

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.queue.close()
        await super().shutdown(sockets)


def serve(engine: Engine, spec: str, shared_secret: str | None = None) -> None:
    """Serve `engine` on [HOST:]PORT until Ctrl-C or SIGTERM; either ends the process normally."""
    host, port = parse_serve_spec(spec)
    if shared_secret == "":
        raise UserError("--shared_secret: the secret must not be empty")
    url_host = f"[{host}]" if ":" in host else host
    print(
        f"serving {engine.cfg.model_dir.name} on http://{url_host}:{port}  (basilisk: /basilisk/..., OpenAI: /v1)"
        + ("" if shared_secret is None else "; requests must carry the shared secret"),
        file=sys.stderr,
    )
    server = EngineServer(create_app(engine, shared_secret, host), host=host, port=port, log_level="info")
    # uvicorn re-raises the signal that stopped it once it has shut down: let SIGTERM end like Ctrl-C
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
