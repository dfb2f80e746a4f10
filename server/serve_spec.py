"""The --serve value, [HOST:]PORT, read without importing the server (or torch): checked before the model loads."""
from __future__ import annotations

import re

from llama.errors import UserError

DEFAULT_HOST = "127.0.0.1"


def parse_serve_spec(spec: str) -> tuple[str, int]:
    """'[HOST:]PORT' -> (host, port); the host defaults to 127.0.0.1, an IPv6 host goes in brackets."""
    match = re.fullmatch(r"(?:(\[[0-9A-Fa-f:.]+\]|[^:\[\]]*):)?(\d+)", spec.strip())
    if match is None:
        raise UserError(f"--serve: expected [HOST:]PORT (like 8000 or 0.0.0.0:8000), got {spec!r}")
    host, port = match.group(1), int(match.group(2))
    if not 1 <= port <= 65535:
        raise UserError(f"--serve: port {port} is outside 1..65535")
    host = (host or DEFAULT_HOST).strip("[]")
    return host, port
