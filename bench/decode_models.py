"""Random resident models of a real shape for bench/decode_bench.py, built straight on the GPU (speed does not
depend on the values): fp16/bf16, int4 in tinygemm's layout, and a checkpoint directory app.py can load."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from bench.offload_bench import synthetic_weights
from engine.fused_projections import fuse_projections
from engine.int4_block_step import int4_block_step
from engine.llama_units import BLOCK_LINEARS
from llama.checkpoint_writer import write_hf_checkpoint
from llama.config import ModelArgs
from llama.loader import empty_model, model_from_state
from llama.model import Transformer
from offload.kernels.int4_format import Int4Weight
from offload.kernels.linear import Int4Linear, prepare_linears_for_cuda

LLAMA2_7B = dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, ffn_dim=11008)
INT4_GROUP = 128


def random_state(args: ModelArgs, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every canonical weight, as offload_bench synthesizes them."""
    return dict(synthetic_weights(args, device, seed, dtype))


def resident_model(args: ModelArgs, dtype: torch.dtype, device: torch.device) -> Transformer:
    """All weights on the device in `dtype`, q/k/v and gate/up fused (what app.py builds on a GPU)."""
    state = random_state(args, dtype, device)
    model = model_from_state(args, state, dtype, device)
    del state  # the model holds the tensors; fusing frees them block by block
    fuse_projections(model)
    return model


def resident_int4_model(args: ModelArgs, device: torch.device) -> Transformer:
    """Block linears as random int4 (groups of 128) prepared for decode (tinygemm's layout, or plain for our
    kernel), the rest bfloat16 (what `--quant int4` builds on a GPU, without the minutes of quantizing random
    weights)."""
    model = empty_model(args)
    gen = torch.Generator(device).manual_seed(1)
    for name, shape in args.weight_shapes().items():
        if not _is_block_linear(name):
            x = torch.ones(shape, device=device) if "norm" in name else torch.randn(shape, generator=gen, device=device)
            _set(model, name, x.to(torch.bfloat16))
    for block in model.layers:
        for path in BLOCK_LINEARS.values():
            linear = block.get_submodule(path)
            _set_module(block, path, Int4Linear(_random_int4(linear.out_features, linear.in_features, gen, device), None))
    model.rope_cos, model.rope_sin = model.rope_cos.to(device), model.rope_sin.to(device)
    fuse_projections(model)
    prepare_linears_for_cuda(model.layers, device)
    for block in model.layers:
        block.fast_path = int4_block_step  # as a resident load installs it (engine/llama_offload.py)
    return model.eval()


def _is_block_linear(name: str) -> bool:
    return name.startswith("layers.") and name.rpartition(".")[0].split(".", 2)[2] in BLOCK_LINEARS.values()


def _random_int4(out_features: int, in_features: int, gen: torch.Generator, device: torch.device) -> Int4Weight:
    groups = in_features // INT4_GROUP
    packed = torch.randint(0, 256, (out_features, in_features // 2), generator=gen, device=device, dtype=torch.uint8)
    scales = (torch.rand(out_features, groups, generator=gen, device=device) * 0.01 + 0.001).to(torch.bfloat16)
    zeros = torch.full((out_features, groups), 8.0, device=device, dtype=torch.bfloat16)
    return Int4Weight(packed=packed, scales=scales, zeros=zeros)


def _set(module: torch.nn.Module, name: str, t: torch.Tensor) -> None:
    path, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(path) if path else module, leaf, torch.nn.Parameter(t, requires_grad=False))


def _set_module(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent), leaf, module)


def write_checkpoint(args: ModelArgs, tokenizer_dir: Path, out_dir: Path, device: torch.device) -> Path:
    """A random fp16 HF checkpoint of `args` (made on the device, written from host RAM) with the tokenizer
    files of tokenizer_dir, for timing app.py as a user runs it."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    state = {n: t.cpu() for n, t in random_state(args, torch.float16, device).items()}
    write_hf_checkpoint(state, args, out_dir, max_shard_bytes=4 * 2**30)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out_dir / name)
    return out_dir
