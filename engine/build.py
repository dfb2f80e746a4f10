"""Build a ready-to-generate Engine (model, tokenizer, chat format, generator) from a RunConfig."""
from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import torch

from engine.batch_size import batch_slots
from engine.choices import pick_device, pick_dtype, pick_gpus, resolve_tokenizer
from engine.config import RESIDENT_PREFILL_CHUNK, RunConfig
from engine.cpu_decode import use_cpu_decode_blocks
from engine.gguf_model import GGUFModel, open_gguf_model
from engine.llama_offload import build_offloaded_model, build_resident_model
from engine.memory_check import check_kv_cache_fits
from engine.offload_messages import flag_messages
from engine.quantized_checkpoint import (
    CPU_HEAD,
    check_quantized_run,
    load_quantized_model,
    read_quantization,
)
from llama.chat_format import ChatFormat
from llama.chat_template import choose_chat_format, find_chat_template
from llama.checkpoint_gptq import GPTQConfig, read_gptq_config
from llama.checkpoint_kind import is_gguf
from llama.config import ModelArgs
from llama.errors import UserError
from llama.generation import Generator
from llama.generation_config import read_generation_config
from llama.gguf_tokenizer import GGUFTokenizer
from llama.loader import read_model_args
from llama.model import Transformer
from llama.slot_cache import SlotKVCache
from llama.tokenizer import Tokenizer
from offload.policy import OffloadConfig
from offload.placement import OffloadedModel
from offload.quant_mode import QuantMode
from offload.split_run import SplitOffloadedModel


@dataclass
class Engine:
    cfg: RunConfig
    args: ModelArgs
    model: Transformer
    tokenizer: Tokenizer
    chat_format: ChatFormat
    generator: Generator  # one sequence, over slot 0 of kv
    device: torch.device
    dtype: torch.dtype
    kv: SlotKVCache  # the KV cache: one slot for the console, --max_batch for the server
    # the streaming state (plan, host store, link) when weights stream; split across --gpus when several
    offloaded: OffloadedModel | SplitOffloadedModel | None = None

    @property
    def ctx(self) -> int:
        return self.generator.max_seq_len

    def close(self) -> None:
        """Stop streaming (the ring's copies, cuDNN attention's switch) and free the pinned host store."""
        if self.offloaded is not None:
            self.offloaded.close()


def build_engine(cfg: RunConfig, log: TextIO | None = None) -> Engine:
    """Load, quantize and place the model cfg describes; every failure the user can fix is a UserError.
    log: where progress notes go (default: sys.stderr at call time, which tests replace)."""
    with flag_messages():
        return _build_engine(cfg, log or sys.stderr)


def _build_engine(cfg: RunConfig, log) -> Engine:
    model_dir = Path(cfg.model_dir)
    if cfg.generation is None:
        cfg = replace(cfg, generation=read_generation_config(model_dir))
    gguf = open_gguf_model(model_dir) if is_gguf(model_dir) else None
    if gguf is None and not model_dir.is_dir():
        raise UserError(f"model directory not found: {model_dir}")
    # A tokenizer argument overrides the one a GGUF's metadata describes.
    tokenizer = GGUFTokenizer(gguf.meta, gguf.path) if gguf and cfg.tokenizer is None else resolve_tokenizer(cfg)
    tokenizer.stop_ids |= set(cfg.generation.eos_ids)
    args = gguf.args if gguf is not None else read_model_args(model_dir, tokenizer.vocab_size)
    quantization = None if gguf else read_quantization(model_dir)  # None unless written by --save_quantized
    gptq = None if gguf else read_gptq_config(model_dir)
    if quantization is not None:
        check_quantized_run(model_dir, quantization, cfg.quant, cfg.use_offload)
    if tokenizer.vocab_size > args.vocab_size:
        raise UserError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model in {model_dir} has "
            f"vocab_size {args.vocab_size}: wrong tokenizer for this model?"
        )
    if cfg.use_offload and not torch.cuda.is_available():
        raise UserError("--use_offload streams weights to a CUDA GPU and none is usable here; drop it to run on the CPU")
    if cfg.gpus is not None:
        pick_gpus(cfg.gpus)  # every index exists, before anything is read
    device = pick_device(cfg.device, cfg.use_offload)
    dtype = pick_dtype(cfg.dtype, device, args)
    ctx = cfg.ctx or min(args.max_seq_len, 4096)
    if ctx > args.max_seq_len:
        print(f"note: --ctx {ctx} is beyond the model's trained {args.max_seq_len} positions", file=log)
    slots = batch_slots(cfg, args, ctx, dtype, device)
    check_kv_cache_fits(args, ctx, dtype, device, slots)
    threads = f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""  # what --threads set
    print(f"loading {model_dir} ({args.n_layers} layers, dim {args.dim}) as {_name(dtype)} on {device}{threads}",
          file=log)
    offloaded: OffloadedModel | None = None
    if gguf is not None:
        model, offloaded = _load_gguf(cfg, gguf, dtype, device, ctx, slots)
    elif gptq is not None:
        model, offloaded = _load_gptq(cfg, model_dir, args, gptq, dtype, device, ctx, slots)
    elif cfg.use_offload:
        model, offloaded = build_offloaded_model(model_dir, _offload_config(cfg, dtype, device, ctx, slots,
                                                                            cfg.quant))
    else:
        model = _load_resident(cfg, model_dir, args, dtype, device, quantization)
    if offloaded is not None:
        device = offloaded.device
    chunk = _prefill_chunk(cfg, offloaded, ctx, log)
    if ctx > model.rope_cos.shape[0]:
        model.set_max_seq_len(ctx)
    if device.type == "cpu":  # under --quant int8|int4 (or saved from it) the head reads an int8 copy too
        int8_head = cfg.quant in (QuantMode.INT8, QuantMode.INT4) or (quantization or {}).get(CPU_HEAD) == "int8"
        use_cpu_decode_blocks(model, int8_head=int8_head)
    template = find_chat_template(model_dir)
    if template is None and gguf is not None and gguf.chat_template and cfg.tokenizer is None:
        template = (gguf.chat_template, f"{gguf.path} (tokenizer.chat_template)")
    fmt = choose_chat_format(cfg.chat_format, tokenizer, model_dir, template)
    # A split model keeps each layer's keys and values beside its block.
    kv_device = offloaded.block_devices if isinstance(offloaded, SplitOffloadedModel) else device
    kv = SlotKVCache(model.args, slots, ctx, dtype, kv_device)
    if cfg.serve is not None:
        gib = kv.nbytes() / 2**30
        print(f"serving up to {slots} sequences at once (--max_batch; KV cache {gib:.2f} GiB)", file=log)
    generator = Generator(model, tokenizer, device, ctx, dtype, chunk, graphs=_graphs(cfg, device, log),
                          notify=lambda line: print(line, file=log), cache=kv.slot(0))
    generator.warm_up()
    return Engine(cfg, args, model, tokenizer, fmt, generator, device, dtype, kv, offloaded)


def _graphs(cfg: RunConfig, device: torch.device, log) -> bool:
    """Whether resident decode steps are captured as CUDA graphs (the Generator captures only a model that is
    entirely on the GPU)."""
    if device.type == "cuda" and cfg.graphs and cfg.quant is QuantMode.BNB and not cfg.use_offload:
        print("note: decode steps run without CUDA graphs: bitsandbytes' LLM.int8 finds its outlier columns on "
              "the host, which a graph cannot record", file=log)
        return False
    return cfg.graphs


def _load_gguf(
    cfg: RunConfig, gguf: GGUFModel, dtype: torch.dtype, device: torch.device, ctx: int, slots: int
) -> tuple[Transformer, OffloadedModel | SplitOffloadedModel | None]:
    from engine.gguf_build import load_gguf_offloaded, load_gguf_resident

    if cfg.quant is QuantMode.BNB:
        raise UserError("--use_8bit (LLM.int8) does not apply to a GGUF; use --quant int8")
    quant = cfg.quant.value if cfg.quant is not None else None
    if not cfg.use_offload:
        return load_gguf_resident(gguf, quant, dtype, device), None
    return load_gguf_offloaded(gguf, quant, _offload_config(cfg, dtype, device, ctx, slots, quant=None))


def _load_gptq(cfg: RunConfig, model_dir: Path, args: ModelArgs, gptq: GPTQConfig, dtype: torch.dtype,
               device: torch.device, ctx: int, slots: int
               ) -> tuple[Transformer, OffloadedModel | SplitOffloadedModel | None]:
    from engine.gptq_model import load_gptq_offloaded, load_gptq_resident

    if cfg.quant not in (None, QuantMode.INT4):
        raise UserError(f"{model_dir} is 4-bit {gptq.method.upper()}: drop --quant / --use_8bit")
    if not cfg.use_offload:
        return load_gptq_resident(model_dir, args, gptq, dtype, device), None
    return load_gptq_offloaded(model_dir, args, gptq, _offload_config(cfg, dtype, device, ctx, slots, quant=None))


def _prefill_chunk(cfg: RunConfig, offloaded: OffloadedModel | SplitOffloadedModel | None, ctx: int, log) -> int:
    """--prefill_chunk; else, when weights stream, the largest chunk whose activations fit the budget (a whole
    pass over the streamed weights serves that many tokens); else RESIDENT_PREFILL_CHUNK."""
    if cfg.prefill_chunk is not None:
        return cfg.prefill_chunk
    if offloaded is None:
        return RESIDENT_PREFILL_CHUNK
    chunk = offloaded.plan.prefill_chunk(ctx)
    print(f"prefill chunk: {chunk} tokens (the largest whose activations fit the GPU budget)", file=log)
    return chunk


def _offload_config(
    cfg: RunConfig, dtype: torch.dtype, device: torch.device, ctx: int, slots: int, quant: QuantMode | None
) -> OffloadConfig:
    """The streaming settings the flags give (quant None: the weights arrive already in their formats;
    slots: sequences the KV cache holds; several --gpus: the blocks split across them)."""
    devices = pick_gpus(cfg.gpus) if cfg.gpus is not None and len(cfg.gpus) > 1 else ()
    return OffloadConfig(
        dtype=dtype,
        device=device,
        exclusions=cfg.offload_exclusion,
        gpu_mem=cfg.gpu_mem,
        devices=devices,
        device_budgets=cfg.gpu_split if devices else None,
        n_slots=cfg.prefetch,
        max_seq_len=ctx,
        kv_sequences=slots,
        prefill_chunk=cfg.prefill_chunk or RESIDENT_PREFILL_CHUNK,
        quant=quant,
    )


def _load_resident(
    cfg: RunConfig,
    model_dir: Path,
    args: ModelArgs,
    dtype: torch.dtype,
    device: torch.device,
    quantization: dict[str, Any] | None,
) -> Transformer:
    """Everything on `device` through the placement path (the plan that keeps every part resident): each block
    quantized as --quant / --use_8bit say (on the GPU when there is one; LLM.int8 must quantize where it
    runs), and on CUDA fused (q/k/v, gate/up) before int4 takes tinygemm's layout; LLM.int8 stays unfused."""
    fuse = device.type == "cuda"
    if quantization is not None:
        return load_quantized_model(model_dir, args, quantization, dtype, device, fuse)
    return build_resident_model(model_dir, args, OffloadConfig(dtype=dtype, device=device, quant=cfg.quant), fuse)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
