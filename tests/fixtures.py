"""Tiny random models and checkpoints for everyone's tests.

Weights are random with a realistic scale (linear layers ~ N(0, 1/fan_in), norms near 1, biases
small), never zeros, so logits have clear winners and greedy decoding is stable across
implementations.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from llama.checkpoint_writer import write_meta_checkpoint
from llama.config import ModelArgs


def tiny_args(arch: str = "llama", **overrides: Any) -> ModelArgs:
    """A 2-layer, 64-wide model of the given family; Mistral and Qwen2 use GQA, Qwen2 has q/k/v biases."""
    fields: dict[str, Any] = {
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 4 if arch == "llama" else 2,
        "vocab_size": 256,
        "ffn_dim": 160,
        "max_seq_len": 128,
        "qkv_bias": arch == "qwen2",
        "arch": arch,
    }
    return ModelArgs(**{**fields, **overrides})


def random_state(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights for every canonical name of args."""
    gen = torch.Generator().manual_seed(seed)
    return {name: _random_tensor(name, shape, gen).to(dtype) for name, shape in args.weight_shapes().items()}


def make_hf_model(args: ModelArgs, out_dir: Path, seed: int = 0) -> Any:
    """A transformers model (Llama/Mistral/Qwen2ForCausalLM) of args' shape with random weights, saved
    to out_dir with save_pretrained (safetensors); returned in eval mode, float32."""
    import transformers

    cls = {
        "llama": transformers.LlamaForCausalLM,
        "mistral": transformers.MistralForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
    }[args.arch]
    model = cls(cls.config_class(**args.to_hf_config()))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_random_tensor(name, tuple(p.shape), gen))
    model.save_pretrained(out_dir, safe_serialization=True)
    return model.eval()


def make_meta_checkpoint(
    args: ModelArgs,
    out_dir: Path,
    state: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    n_shards: int = 1,
    vocab_parallel_embedding: bool = False,
) -> dict[str, torch.Tensor]:
    """A Meta checkpoint (params.json + consolidated.NN.pth) of state (random when None); returns the state."""
    state = random_state(args, seed) if state is None else state
    write_meta_checkpoint(state, args, out_dir, n_shards=n_shards, vocab_parallel_embedding=vocab_parallel_embedding)
    return state


def _random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """By name, HF or canonical: norms 1 + N(0, 0.1), biases N(0, 0.1), embeddings N(0, 1), matrices N(0, 1/fan_in)."""
    x = torch.randn(shape, generator=gen)
    if "norm" in name:
        return 1.0 + 0.1 * x
    if name.endswith("bias"):
        return 0.1 * x
    if "embed" in name:
        return x
    return x / math.sqrt(shape[1])
