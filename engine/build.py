"""Build a ready-to-generate Engine (model, tokenizer, chat format, generator) from a RunConfig."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from tqdm import tqdm

from engine.config import RESIDENT_PREFILL_CHUNK, DeviceSpec, RunConfig
from engine.memory_check import check_kv_cache_fits
from engine.offload_messages import flag_messages
from engine.quantized_checkpoint import (
    check_quantized_run,
    load_quantized_model,
    read_quantization,
)
from llama.chat_format import ChatFormat, detect_chat_format, get_chat_format
from llama.config import ModelArgs
from llama.errors import UserError
from llama.generation import Generator
from llama.generation_config import checkpoint_eos_ids
from llama.loader import load_model, read_model_args
from llama.model import Transformer
from llama.tokenizer import Tokenizer, load_tokenizer
from offload.quant_mode import QuantMode

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


def pick_device(spec: DeviceSpec, use_offload: bool = False) -> torch.device:
    """The torch device for --device; auto is cuda when available (always cuda when streaming)."""
    if spec.kind == "auto":
        return torch.device("cuda" if use_offload or torch.cuda.is_available() else "cpu")
    if spec.kind == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no usable CUDA GPU here; run with --device cpu")
    return torch.device(spec.kind, spec.index)


def pick_dtype(name: str, device: torch.device, args: ModelArgs) -> torch.dtype:
    """auto: float16 on a GPU; float32 on the CPU when it fits comfortably in RAM, else bfloat16."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.float16
    fp32_bytes = sum(math.prod(s) for s in args.weight_shapes().values()) * 4
    return torch.float32 if fp32_bytes < 0.5 * psutil.virtual_memory().available else torch.bfloat16


def resolve_tokenizer(cfg: RunConfig) -> Tokenizer:
    path = cfg.tokenizer if cfg.tokenizer is not None else cfg.model_dir
    return load_tokenizer(Path(path))


def build_engine(cfg: RunConfig, log=sys.stderr) -> Engine:
    """Load, quantize and place the model cfg describes; every failure the user can fix is a UserError."""
    with flag_messages():
        return _build_engine(cfg, log)


def _build_engine(cfg: RunConfig, log) -> Engine:
    model_dir = Path(cfg.model_dir)
    if not model_dir.is_dir():
        raise UserError(f"model directory not found: {model_dir}")
    tokenizer = resolve_tokenizer(cfg)
    tokenizer.stop_ids |= checkpoint_eos_ids(model_dir)
    args = read_model_args(model_dir, tokenizer.vocab_size)
    quantization = read_quantization(model_dir)  # None unless written by --save_quantized
    if quantization is not None:
        check_quantized_run(model_dir, quantization, cfg.quant, cfg.use_offload)
    if tokenizer.vocab_size > args.vocab_size:
        raise UserError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model in {model_dir} has "
            f"vocab_size {args.vocab_size}: wrong tokenizer for this model?"
        )
    if cfg.use_offload and not torch.cuda.is_available():
        raise UserError("--use_offload streams weights to a CUDA GPU and none is usable here; drop it to run on the CPU")
    device = pick_device(cfg.device, cfg.use_offload)
    dtype = pick_dtype(cfg.dtype, device, args)
    ctx = cfg.ctx or min(args.max_seq_len, 4096)
    if ctx > args.max_seq_len:
        print(f"note: --ctx {ctx} is beyond the model's trained {args.max_seq_len} positions", file=log)
    check_kv_cache_fits(args, ctx, dtype, device)
    print(f"loading {model_dir} ({args.n_layers} layers, dim {args.dim}) as {_name(dtype)} on {device}", file=log)
    if cfg.use_offload:
        model, device = _load_offloaded(cfg, model_dir, dtype, device, ctx)
    else:
        model = _load_resident(cfg, model_dir, args, dtype, device, quantization)
    if ctx > model.rope_cos.shape[0]:
        model.set_max_seq_len(ctx)
    fmt = get_chat_format(cfg.chat_format or detect_chat_format(tokenizer, model_dir), tokenizer)
    generator = Generator(model, tokenizer, device, ctx, dtype, cfg.prefill_chunk or RESIDENT_PREFILL_CHUNK)
    return Engine(cfg, args, model, tokenizer, fmt, generator, device, dtype)


def _load_offloaded(
    cfg: RunConfig, model_dir: Path, dtype: torch.dtype, device: torch.device, ctx: int
) -> tuple[Transformer, torch.device]:
    from offload.engine import build_offloaded_model
    from offload.policy import OffloadConfig

    config = OffloadConfig(
        dtype=dtype,
        device=device,
        exclusions=cfg.offload_exclusion,
        gpu_mem=cfg.gpu_mem,
        n_slots=cfg.prefetch,
        max_seq_len=ctx,
        prefill_chunk=cfg.prefill_chunk or RESIDENT_PREFILL_CHUNK,
        quant=cfg.quant,
    )
    model, offloaded = build_offloaded_model(model_dir, config)
    return model, offloaded.device


def _load_resident(
    cfg: RunConfig,
    model_dir: Path,
    args: ModelArgs,
    dtype: torch.dtype,
    device: torch.device,
    quantization: dict[str, Any] | None,
) -> Transformer:
    from offload.kernels.linear import prepare_linears_for_cuda, quantize_linears

    mode = cfg.quant
    if quantization is not None:
        mode = QuantMode(quantization["format"])
        model = load_quantized_model(model_dir, args, quantization, dtype)  # on the CPU, as saved
    elif mode is None:
        return load_model(model_dir, dtype=dtype, device=device, vocab_size=args.vocab_size, progress=True)
    else:
        model = load_model(model_dir, dtype=dtype, device="cpu", vocab_size=args.vocab_size, progress=True)
        if mode is QuantMode.BNB:
            # LLM.int8 must quantize where it will run: one block at a time crosses at full size.
            for block in tqdm(model.layers, desc="quantizing to LLM.int8", unit="block"):
                quantize_linears(block.to(device), mode, progress=False)
        else:
            quantize_linears(model.layers, mode)  # in host RAM: the GPU never holds full-size blocks
    model.to(device)
    if device.type == "cuda" and mode is QuantMode.INT4:
        prepare_linears_for_cuda(model.layers, device)
    return model


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
