"""A checkpoint's own sampling defaults: Hugging Face's generation_config.json beside the weights.

Read fields: temperature, top_p, top_k, min_p, repetition_penalty (as SamplingParams fields),
`do_sample: false` (greedy: temperature 0, as transformers reads it) and eos_token_id (an id or a list,
extra stop ids). Command-line flags override all of them. A field of the wrong type is a UserError
naming the file and the field. Imports no torch: the flag parser reads these defaults.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from llama.errors import UserError
from llama.json_file import read_json
from llama.sampling_params import SamplingParams

GENERATION_CONFIG = "generation_config.json"
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty")


def _path(model_dir: Path) -> Path | None:
    path = Path(model_dir) / GENERATION_CONFIG
    return path if path.is_file() else None


def checkpoint_sampling(model_dir: Path) -> dict[str, Any]:
    """SamplingParams fields the checkpoint sets ({} without a generation_config.json)."""
    path = _path(model_dir)
    if path is None:
        return {}
    cfg = read_json(path)
    out: dict[str, Any] = {}
    for name in _FLOAT_FIELDS:
        value = cfg.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{path}: field {name!r} must be a finite number, got {value!r}")
        out[name] = float(value)
    top_k = cfg.get("top_k")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise UserError(f"{path}: field 'top_k' must be an integer >= 0, got {top_k!r}")
        out["top_k"] = top_k
    if cfg.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def sampling_params(model_dir: Path, flags: dict[str, Any]) -> SamplingParams:
    """SamplingParams from the flags given (not None), else the checkpoint's defaults, else SamplingParams'."""
    own = checkpoint_sampling(model_dir)
    try:
        SamplingParams(**own)
    except UserError as e:
        raise UserError(f"{_path(model_dir)}: {str(e).removeprefix('--')}") from None
    return SamplingParams(**{**own, **{k: v for k, v in flags.items() if v is not None}})


def checkpoint_eos_ids(model_dir: Path) -> set[int]:
    """The eos_token_id(s) of generation_config.json (empty without one)."""
    path = _path(model_dir)
    if path is None:
        return set()
    value = read_json(path).get("eos_token_id")
    ids = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise UserError(f"{path}: field 'eos_token_id' must be a token id or a list of them, got {value!r}")
    return set(ids)
