"""GET /health: whether the server is up, and how many requests wait for the engine; answered at once,
whatever the engine is doing, and without the shared secret (for load balancers and supervisors)."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from server.state import State

HEALTH_PATH = "/health"

router = APIRouter()


@router.get(HEALTH_PATH)
async def health(state: State) -> dict[str, Any]:
    return {"status": "ok", "queued": state.queue.waiting}
