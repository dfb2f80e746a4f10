"""What a RunConfig's device, dtype and tokenizer mean on this machine (shared by every way of loading)."""
from __future__ import annotations

import math
from pathlib import Path

import psutil
import torch

from engine.config import DeviceSpec, RunConfig
from llama.config import ModelArgs
from llama.errors import UserError
from llama.tokenizer import Tokenizer, load_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(spec: DeviceSpec, use_offload: bool = False) -> torch.device:
    """The torch device for --device; auto is cuda when available (always cuda when streaming)."""
    if spec.kind == "auto":
        return torch.device("cuda" if use_offload or torch.cuda.is_available() else "cpu")
    if spec.kind == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no usable CUDA GPU here; run with --device cpu")
    return torch.device(spec.kind, spec.index)


def pick_gpus(indices: tuple[int, ...]) -> tuple[torch.device, ...]:
    """The CUDA devices --gpus names, each checked to exist here."""
    count = torch.cuda.device_count()
    missing = next((i for i in indices if i >= count), None)
    if missing is not None:
        have = f"{count}: 0-{count - 1}" if count > 1 else ("1: 0" if count else "none")
        raise UserError(f"--gpus: there is no GPU {missing} here (CUDA GPUs visible: {have})")
    return tuple(torch.device("cuda", i) for i in indices)


def pick_dtype(name: str, device: torch.device, args: ModelArgs) -> torch.dtype:
    """auto: float16 on a GPU; float32 on the CPU when it fits comfortably in RAM, else bfloat16."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.float16
    fp32_bytes = sum(math.prod(s) for s in args.weight_shapes().values()) * 4
    return torch.float32 if fp32_bytes < 0.5 * psutil.virtual_memory().available else torch.bfloat16


def resolve_tokenizer(cfg: RunConfig) -> Tokenizer:
    """The TOKENIZER argument, else the one in the model directory (whose generation_config.json the edge read
    already)."""
    if cfg.tokenizer is not None:
        return load_tokenizer(Path(cfg.tokenizer))
    return load_tokenizer(Path(cfg.model_dir), cfg.generation)
