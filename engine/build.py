"""Build a ready-to-generate Engine (model, tokenizer, chat format, generator) from a RunConfig."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from engine.config import RunConfig
from llama.chat_format import ChatFormat, detect_chat_format, get_chat_format
from llama.config import ModelArgs
from llama.errors import UserError
from llama.generation import Generator
from llama.loader import load_model, read_model_args
from llama.model import Transformer
from llama.tokenizer import Tokenizer, load_tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Engine:
    cfg: RunConfig
    args: ModelArgs
    model: Transformer
    tokenizer: Tokenizer
    chat_format: ChatFormat
    generator: Generator
    device: torch.device
    dtype: torch.dtype

    @property
    def ctx(self) -> int:
        return self.generator.max_seq_len


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: unknown device {name!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no usable CUDA GPU here; run with --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device: unsupported device {name!r} (use cpu, cuda or cuda:N)")
    return device


def pick_dtype(name: str, device: torch.device, args: ModelArgs) -> torch.dtype:
    """auto: float16 on a GPU; float32 on the CPU when it fits comfortably in RAM, else bfloat16."""
    if name != "auto":
        if name not in _DTYPES:
            raise UserError(f"--dtype: unknown dtype {name!r} (choose from {', '.join(_DTYPES)})")
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.float16
    fp32_bytes = sum(_numel(s) for s in args.weight_shapes().values()) * 4
    return torch.float32 if fp32_bytes < 0.5 * psutil.virtual_memory().available else torch.bfloat16


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def resolve_tokenizer(cfg: RunConfig) -> Tokenizer:
    path = cfg.tokenizer if cfg.tokenizer is not None else cfg.model_dir
    return load_tokenizer(Path(path))


def build_engine(cfg: RunConfig, log=sys.stderr) -> Engine:
    model_dir = Path(cfg.model_dir)
    if not model_dir.is_dir():
        raise UserError(f"model directory not found: {model_dir}")
    tokenizer = resolve_tokenizer(cfg)
    args = read_model_args(model_dir, tokenizer.vocab_size)
    if tokenizer.vocab_size > args.vocab_size:
        raise UserError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model in {model_dir} has "
            f"vocab_size {args.vocab_size}: wrong tokenizer for this model?"
        )
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device, args)
    ctx = cfg.ctx or min(args.max_seq_len, 4096)
    if ctx > args.max_seq_len:
        print(f"note: --ctx {ctx} is beyond the model's trained {args.max_seq_len} positions", file=log)
    print(f"loading {model_dir} ({args.n_layers} layers, dim {args.dim}) as {_name(dtype)} on {device}", file=log)
    model = load_model(model_dir, dtype=dtype, device=device, vocab_size=args.vocab_size)
    if ctx > model.rope_cos.shape[0]:
        model.set_max_seq_len(ctx)
    fmt = get_chat_format(cfg.chat_format or detect_chat_format(tokenizer, model_dir), tokenizer)
    generator = Generator(model, tokenizer, device, ctx, dtype, cfg.prefill_chunk)
    return Engine(cfg, args, model, tokenizer, fmt, generator, device, dtype)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
