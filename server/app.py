"""The HTTP server: basilisk's endpoints and an OpenAI-compatible API over one Engine.

`serve(engine, "[HOST:]PORT", secret)` runs it with uvicorn until interrupted; `create_app` builds the
FastAPI app alone (tests run it on a socket of their own).
"""
from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI

from engine.build import Engine
from llama.errors import UserError
from server import basilisk, openai_api
from server.auth import SharedSecretAuth
from server.errors import install_error_handlers
from server.queue import EngineQueue
from server.serve_spec import parse_serve_spec
from server.state import ServerState


def create_app(engine: Engine, shared_secret: str | None = None) -> FastAPI:
    """The app serving `engine`; with a secret, every request must carry it (see server.auth)."""
    app = FastAPI(title="llama-offload", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = ServerState(engine, EngineQueue(engine.generator), model_name=engine.cfg.model_dir.name)
    app.include_router(basilisk.router)
    app.include_router(openai_api.router)
    install_error_handlers(app)
    if shared_secret is not None:
        app.add_middleware(SharedSecretAuth, secret=shared_secret)
    return app


def serve(engine: Engine, spec: str, shared_secret: str | None = None) -> None:
    """Serve `engine` on [HOST:]PORT until Ctrl-C."""
    host, port = parse_serve_spec(spec)
    if shared_secret == "":
        raise UserError("--shared_secret: the secret must not be empty")
    url_host = f"[{host}]" if ":" in host else host
    print(
        f"serving {engine.cfg.model_dir.name} on http://{url_host}:{port}  (basilisk: /basilisk/..., OpenAI: /v1)"
        + ("" if shared_secret is None else "; requests must carry the shared secret"),
        file=sys.stderr,
    )
    uvicorn.run(create_app(engine, shared_secret), host=host, port=port, log_level="info")
