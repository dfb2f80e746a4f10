"""Reading a JSON object from a file, with a one-line error naming it (imports no torch)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llama.errors import UserError


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from path, or a UserError naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data
