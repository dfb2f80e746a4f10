"""Typed reads of config.json / params.json fields: a wrong type or range is a UserError naming file and field.

JSON gives strings, booleans and floats where a size belongs as easily as integers; int() would accept
"4096" and 64.7 silently and raise a traceback on "big". These readers accept only what the field means.
"""
from __future__ import annotations

import math
from typing import Any

from llama.errors import UserError

_REQUIRED = object()


def int_field(cfg: dict[str, Any], key: str, source: str, least: int = 1, default: Any = _REQUIRED) -> Any:
    """cfg[key] as an int >= least (a float with an integer value is accepted); default when absent or null."""
    value = cfg.get(key)
    if value is None:
        if default is _REQUIRED:
            raise UserError(f"{source}: missing field {key!r}")
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{source}: field {key!r} must be an integer, got {value!r}")
    if value < least:
        raise UserError(f"{source}: field {key!r} must be at least {least}, got {value}")
    return value


def float_field(
    cfg: dict[str, Any], key: str, source: str, default: Any = _REQUIRED, positive: bool = False,
    nonnegative: bool = False,
) -> Any:
    """cfg[key] as a finite float (> 0 if positive, >= 0 if nonnegative); default when absent or null."""
    value = cfg.get(key)
    if value is None:
        if default is _REQUIRED:
            raise UserError(f"{source}: missing field {key!r}")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{source}: field {key!r} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise UserError(f"{source}: field {key!r} must be greater than 0, got {value}")
    if nonnegative and value < 0:
        raise UserError(f"{source}: field {key!r} must not be negative, got {value}")
    return float(value)


def object_field(cfg: dict[str, Any], key: str, source: str) -> dict[str, Any]:
    """cfg[key] as a JSON object ({} when absent or null)."""
    value = cfg.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{source}: field {key!r} must be an object, got {type(value).__name__}")
    return value
