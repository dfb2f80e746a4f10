"""What every route needs: the engine, its request queue, and the checks that a request fits the context."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Annotated, Any

from fastapi import Depends, Request

from engine.build import Engine
from llama.errors import UserError
from llama.sampling import SamplingParams
from server.errors import ApiError
from server.queue import EngineQueue


@dataclass
class ServerState:
    engine: Engine
    queue: EngineQueue
    model_name: str  # the one model this server answers with (the model directory's name)
    started: int = field(default_factory=lambda: int(time.time()))

    @property
    def ctx(self) -> int:
        return self.engine.ctx

    def sampling(self, **changes: Any) -> SamplingParams:
        """The server's sampling settings with a request's changes; one that SamplingParams refuses is a 400."""
        try:
            return replace(self.engine.cfg.sampling, **changes)
        except UserError as e:
            raise ApiError(400, str(e).replace("--", "", 1)) from None

    def check_prompt(self, n_prompt: int, param: str) -> None:
        """A prompt must leave room for at least one new token."""
        if n_prompt == 0:
            raise ApiError(400, f"'{param}' is empty: it encodes to no tokens", param=param)
        if n_prompt >= self.ctx:
            raise ApiError(
                400,
                f"the prompt is {n_prompt} tokens but the context holds {self.ctx} (with room for at least one "
                f"new token): shorten '{param}'",
                param=param, code="context_length_exceeded",
            )

    def room(self, n_prompt: int) -> int:
        """How many new tokens fit after a prompt of n_prompt tokens."""
        return self.ctx - n_prompt

    def check_max_tokens(self, n_prompt: int, max_tokens: int, param: str) -> None:
        if max_tokens > self.room(n_prompt):
            raise ApiError(
                400,
                f"'{param}' is {max_tokens} but the prompt's {n_prompt} tokens leave room for only "
                f"{self.room(n_prompt)} in the context of {self.ctx}: lower '{param}'",
                param=param, code="context_length_exceeded",
            )


def server_state(request: Request) -> ServerState:
    """FastAPI dependency: the ServerState of the app serving `request`."""
    return request.app.state.server


State = Annotated[ServerState, Depends(server_state)]  # route parameter type that receives the ServerState
