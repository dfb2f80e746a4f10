"""A checkpoint's own generation settings: Hugging Face's generation_config.json beside the weights, read once.

Read fields: temperature, top_p, top_k, min_p, repetition_penalty (as SamplingParams fields),
`do_sample: false` (greedy: temperature 0, as transformers reads it) and eos_token_id (an id or a list,
extra stop ids). Command-line flags override the sampling fields. A field of the wrong type or range is a
UserError naming the file and the field, raised by the one read (at the edge, before anything slow).
Imports no torch: the flag parser reads these defaults.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama.errors import UserError
from llama.json_file import read_json
from llama.sampling_params import SamplingParams

GENERATION_CONFIG = "generation_config.json"
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty")


@dataclass(frozen=True)
class GenerationConfig:
    """What a generation_config.json says; empty where there is none."""

    sampling: Mapping[str, Any] = field(default_factory=dict)  # the SamplingParams fields it sets
    eos_ids: tuple[int, ...] = ()  # its eos_token_id(s), in the file's order


def read_generation_config(model_dir: Path) -> GenerationConfig:
    """model_dir's generation_config.json, every field checked (GenerationConfig() without one)."""
    path = Path(model_dir) / GENERATION_CONFIG
    if not path.is_file():
        return GenerationConfig()
    cfg = read_json(path)
    sampling = _sampling_fields(cfg, path)
    try:
        SamplingParams(**sampling)
    except UserError as e:
        raise UserError(f"{path}: {str(e).removeprefix('--')}") from None
    return GenerationConfig(sampling, _eos_ids(cfg.get("eos_token_id"), path))


def sampling_params(generation: GenerationConfig, flags: dict[str, Any]) -> SamplingParams:
    """SamplingParams from the flags given (not None), else the checkpoint's defaults, else SamplingParams'."""
    return SamplingParams(**{**generation.sampling, **{k: v for k, v in flags.items() if v is not None}})


def _sampling_fields(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
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


def _eos_ids(value: Any, path: Path) -> tuple[int, ...]:
    ids = value if isinstance(value, list) else [] if value is None else [value]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise UserError(f"{path}: field 'eos_token_id' must be a token id or a list of them, got {value!r}")
    return tuple(ids)
